"""gateways/bridge.py: PendingReplies, the registry shutdown answers waiting requests from."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from actors.errors import Unavailable
from gateways.bridge import PendingReplies, TrioReply


async def test_close_answers_every_waiting_reply_with_unavailable() -> None:
    pending = PendingReplies()
    replies = [TrioReply() for _ in range(3)]
    for reply in replies:
        pending.add(reply)
    errors: list[BaseException] = []

    async def wait(reply: TrioReply) -> None:
        with pytest.raises(Unavailable) as caught:
            await reply.wait(60)
        errors.append(caught.value)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for reply in replies:
                nursery.start_soon(wait, reply)
            await trio.sleep(0.01)  # all three are waiting
            pending.close("server is shutting down")
    assert [str(e) for e in errors] == ["server is shutting down"] * 3
    assert len({id(e) for e in errors}) == 3  # one error each: raised in their own tasks
    assert len(pending) == 0


async def test_after_close_add_refuses_before_anything_is_told() -> None:
    pending = PendingReplies()
    pending.close("server is shutting down")
    with pytest.raises(Unavailable, match="server is shutting down"):
        pending.add(TrioReply())
    assert len(pending) == 0


async def test_a_discarded_reply_is_left_alone_and_a_late_answer_is_ignored() -> None:
    pending = PendingReplies()
    done, waiting = TrioReply(), TrioReply()
    pending.add(done)
    pending.add(waiting)
    done.ok("answered")
    assert await done.wait(1) == "answered"
    pending.discard(done)
    pending.discard(done)  # twice is fine (a handler's finally after close)
    assert len(pending) == 1
    pending.close()
    # The actor answers after shutdown answered: the first answer stands.
    thread = threading.Thread(target=waiting.ok, args=("too late",))
    thread.start()
    thread.join()
    await trio.sleep(0.01)
    with pytest.raises(Unavailable):
        await waiting.wait(1)
    assert await done.wait(1) == "answered"


async def test_an_answer_from_an_actor_thread_wakes_the_waiting_task() -> None:
    reply = TrioReply()
    failed = TrioReply()

    def actor() -> None:
        time.sleep(0.02)  # the task is parked by now
        reply.ok({"code": 0})
        failed.fail(Unavailable("device actor stopped"))

    threading.Thread(target=actor).start()
    with trio.fail_after(5):
        assert await reply.wait(5) == {"code": 0}
        with pytest.raises(Unavailable, match="device actor stopped"):
            await failed.wait(5)


async def test_a_timed_out_or_cancelled_wait_ignores_a_later_answer() -> None:
    timed_out, cancelled = TrioReply(), TrioReply()
    with pytest.raises(trio.TooSlowError):
        await timed_out.wait(0.01)
    with trio.move_on_after(0.01) as scope:
        await cancelled.wait(60)
    assert scope.cancelled_caught
    # The actors answer after their callers gave up: nobody is woken, the loop carries on.
    for reply in (timed_out, cancelled):
        thread = threading.Thread(target=reply.ok, args=("late",))
        thread.start()
        thread.join()
    await trio.sleep(0.01)
    assert await timed_out.wait(1) == "late"  # recorded, for anyone who asks again
