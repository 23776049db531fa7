"""What actors need from outside, as small interfaces (gateways implement them)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol


class Reply(Protocol):
    """Where an actor sends the outcome of a command. Called on the actor's thread."""

    def ok(self, value: Any = None) -> None: ...

    def fail(self, error: Exception) -> None: ...


class NoReply:
    """For fire-and-forget messages (QoS 0 telemetry)."""

    def ok(self, value: Any = None) -> None:
        pass

    def fail(self, error: Exception) -> None:
        pass


class FutureReply:
    """A reply read by a thread that can block (tests, CLI, benchmarks)."""

    def __init__(self) -> None:
        self.future: Future[Any] = Future()

    def ok(self, value: Any = None) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def get(self, timeout: float | None = 10.0) -> Any:
        return self.future.result(timeout)


class DeviceLink(Protocol):
    """The way to a device: the MQTT gateway publishes on the device's command topic."""

    @property
    def connected(self) -> bool:
        """Whether a command can go out now and its answer come back (connected and subscribed)."""
        ...

    # Since when (wall clock, s) devices can be heard (connected and subscribed); None while
    # they cannot. Optional: a link without it is taken as always listening.
    listening_since: float | None

    def publish_command(self, product_id: str, device_id: str, payload: dict[str, Any]) -> Any:
        """Hand a command to the broker; returns a handle for `withdraw`. Raises
        `Unavailable` if it cannot be sent now: it is then never sent later either."""
        ...

    def withdraw(self, handle: Any) -> None:
        """A command past its deadline: if the broker has not acknowledged it yet, never
        send it again (after a reconnect, say); a device must not act on an expired command."""
        ...


NO_REPLY = NoReply()


class Traced:
    """A message with the structlog context of whoever sent it (an HTTP request id, say),
    so the actor's log lines about it carry the same context on the actor's thread."""

    __slots__ = ("context", "message")

    def __init__(self, context: dict[str, Any], message: Any) -> None:
        self.context = context
        self.message = message


def untraced(message: Any) -> Any:
    return message.message if isinstance(message, Traced) else message


class Burst:
    """Several batchable messages for one actor in one envelope (`ActorSystem.tell_many`):
    one put into its inbox and one get out of it, instead of one of each per message
    (a Python-level queue operation costs 1-2 µs)."""

    __slots__ = ("messages",)

    def __init__(self, messages: tuple[Any, ...]) -> None:
        self.messages = messages


def unpacked(message: Any) -> tuple[Any, ...]:
    """The messages inside an inbox item: untraced, and a burst opened."""
    message = untraced(message)
    return message.messages if isinstance(message, Burst) else (message,)
