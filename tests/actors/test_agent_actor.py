"""AgentActor: an update or delete meant for one incarnation of an agent_id never reaches
the next (an agent deleted and created again keeps its stream but gets a new id)."""

from __future__ import annotations

from typing import Any

import pytest

from actors.agent import AgentActor, CreateAgent, DeleteAgent, UpdateAgent
from actors.errors import AgentNotFound, InvalidAgent
from actors.ports import FutureReply
from tests.support import agent_config, make_runtime


def ask(runtime: Any, msg_factory: Any) -> int:
    reply = FutureReply()
    runtime.system.tell(AgentActor, ("fan",), msg_factory(reply))
    return reply.get(10)


def create(runtime: Any) -> int:
    return ask(runtime, lambda r: CreateAgent(agent_config("fan"), reply=r))


def test_an_old_id_does_not_reach_the_agent_created_again(tmp_path):
    runtime = make_runtime(tmp_path)
    try:
        old = create(runtime)
        ask(runtime, lambda r: UpdateAgent({"name": "first fan"}, old, reply=r))
        ask(runtime, lambda r: DeleteAgent(old, reply=r))
        new = create(runtime)
        assert new != old
        # A PUT or DELETE decided on by the old id (looked up before the delete) arrives now.
        for late in (lambda r: UpdateAgent({"name": "written via the old id"}, old, reply=r),
                     lambda r: DeleteAgent(old, reply=r)):
            with pytest.raises(AgentNotFound):
                ask(runtime, late)
        ask(runtime, lambda r: UpdateAgent({"name": "second fan"}, new, reply=r))
        ask(runtime, lambda r: UpdateAgent({"name": "any fan"}, None, reply=r))  # no id: whichever lives
    finally:
        runtime.close()
    # A fresh process (the actor reads the id from the log): the same.
    runtime = make_runtime(tmp_path)
    try:
        with pytest.raises(AgentNotFound):
            ask(runtime, lambda r: UpdateAgent({"name": "old again"}, old, reply=r))
        ask(runtime, lambda r: UpdateAgent({"name": "new again"}, new, reply=r))
        assert runtime.log.load(AgentActor.stream_id(("fan",))).config["name"] == "new again"
    finally:
        runtime.close()


def test_an_update_that_would_leave_an_invalid_agent_names_the_field(tmp_path):
    runtime = make_runtime(tmp_path)
    try:
        position = create(runtime)
        with pytest.raises(InvalidAgent) as exc:
            ask(runtime, lambda r: UpdateAgent({"is_custom_agent": True}, position, reply=r))
        assert list(exc.value.errors) == ["custom_agent_endpoint"]
    finally:
        runtime.close()
