"""Named errors that actors reply with. Gateways map them to their API's error shape."""


class ParleyError(Exception):
    """Base of the errors a command can be refused with; `code` is machine-readable."""

    code = "error"


class DeviceNotFound(ParleyError):
    code = "device_not_found"


class DeviceOffline(ParleyError):
    code = "device_offline"


class InvalidCommand(ParleyError):
    code = "invalid_command"


class InvalidAgent(InvalidCommand):
    """An agent update that would leave an invalid agent; `errors` per field, as the HTTP
    API reports them (field -> messages)."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{k}: {', '.join(v)}" for k, v in errors.items()))
        self.errors = errors


class StateTooLarge(ParleyError):
    """A device report whose state would grow the device's past its bound (nothing stored)."""

    code = "state_too_large"


class CommandTimedOut(ParleyError):
    code = "command_timeout"


class AgentNotFound(ParleyError):
    code = "agent_not_found"


class AgentAlreadyExists(ParleyError):
    code = "agent_exists"


class ActorCrashed(ParleyError):
    """The actor failed on this command; it was restarted from the log."""

    code = "internal_error"


class Unavailable(ParleyError):
    """The system is shutting down or a dependency (the journal) is gone."""

    code = "unavailable"


class HeldBack(Unavailable):
    """Not tried: a report of the same device queued before it failed to commit. The sender
    tries it again after that one, so that it does not land first."""
