"""The agents view reads stored specs as written: an agent an older version accepted loads
(whatever the input rules are now), and one that cannot be read at all is logged and left
without a spec instead of stopping the server."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from eventsourcing.persistence import StoredEvent

from actors.agent import Agent, AgentActor, UpdateAgent
from actors.errors import InvalidCommand
from actors.ports import FutureReply
from eventstore import EventLog, StoreConfig
from eventstore.transcoder import MsgpackTranscoder
from tests.support import make_runtime

OLD_TIMESTAMP = datetime(2026, 5, 11, 10, 0, tzinfo=timezone.utc)
# An agent as 3872f37 stored it (AgentConfig(...).to_record(), lax types): its integer
# parameter's enum has a string, the spec has both `telemetry` and `properties` (the older
# name, kept as an extra field) and `voice_type` is blank. The input rules of today refuse
# all three; the stored agent must still load.
OLD_SPEC: dict[str, Any] = {
    "name": "", "description": "",
    "commands": {"set_speed": {"description": "", "parameters": {
        "speed": {"type": "integer", "description": "", "required": True, "enum": [1, 2, "max"]}}}},
    "telemetry": {"rpm": {"type": "integer", "description": "", "defaultValue": None}},
    "events": {},
    "properties": {"rpm": {"type": "integer"}},
}
OLD_CONFIG: dict[str, Any] = {
    "name": "fan agent", "agent_type": "single", "voice_type": "", "is_custom_agent": False,
    "sys_prompt": None, "welcome_message": None, "custom_agent_endpoint": None,
    "custom_agent_http_headers": {}, "emqx_config_id": None, "mqtt_opts": {}, "tools": [],
    "data_definitions": [], "device_spec": OLD_SPEC, "agent_id": "fan",
}
# No version of Parley accepted this: a parameter type outside the format.
CORRUPT_SPEC: dict[str, Any] = {"commands": {"set_speed": {"parameters": {"speed": {"type": "float"}}}}}


def write_old_agents(data_dir: Path, configs: dict[str, dict[str, Any]]) -> None:
    """Each agent's Created event as the `@event` aggregate stores it, straight into the log
    (no model between: the data is what an older version wrote)."""
    log = EventLog(StoreConfig.resolve(data_dir, None))
    transcoder = MsgpackTranscoder()
    try:
        log._app.recorder.insert_events([
            StoredEvent(originator_id=Agent.create_id(agent_id), originator_version=1,
                        topic="actors.agent.aggregate:Agent.Created",
                        state=transcoder.encode({"timestamp": OLD_TIMESTAMP,
                                                 "originator_topic": "actors.agent.aggregate:Agent",
                                                 "agent_id": agent_id, "config": config}))
            for agent_id, config in configs.items()])
    finally:
        log.close()


def unreadable(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "agents.unreadable_spec"]


def check_old_spec(runtime: Any) -> None:
    record = runtime.agents.get("fan")
    assert record is not None and record.inserted_at == "2026-05-11T10:00:00Z"
    spec = record.device_spec
    assert spec is not None and set(spec.telemetry) == {"rpm"}
    assert spec.model_dump(mode="json") == OLD_SPEC  # as written, `properties` too
    spec.check_command("set_speed", {"speed": 2})  # what can be checked still is
    with pytest.raises(InvalidCommand, match="speed: 3 is not one of"):
        spec.check_command("set_speed", {"speed": 3})
    with pytest.raises(InvalidCommand, match="speed: 'max' is not of type 'integer'"):
        spec.check_command("set_speed", {"speed": "max"})  # never usable, as before
    with pytest.raises(InvalidCommand, match="'speed' is a required property"):
        spec.check_command("set_speed", {})


def test_an_agent_an_older_version_stored_loads_as_written(tmp_path: Path) -> None:
    write_old_agents(tmp_path, {"fan": OLD_CONFIG})
    with structlog.testing.capture_logs() as logs:
        runtime = make_runtime(tmp_path)  # used to die here with a ValidationError
        try:
            assert runtime.projections.wait_for(runtime.log.max_position(), 10)
            check_old_spec(runtime)  # the mirror, from the events
            # The view's rows, from a rebuild of the view and then a restart.
            with runtime.views_db.transaction() as cur:
                cur.execute("DELETE FROM parley_agents")
                cur.execute("DELETE FROM parley_tracking")
            runtime.projections.position = 0
            runtime.projections.catch_up()
            check_old_spec(runtime)
        finally:
            runtime.close()
        runtime = make_runtime(tmp_path)
        try:
            check_old_spec(runtime)
            # The old agent can be updated: the changes are checked, the stored rest is not.
            reply = FutureReply()
            runtime.system.tell(AgentActor, ("fan",), UpdateAgent({"name": "ceiling fan"}, reply=reply))
            assert runtime.projections.wait_for(reply.get(10), 10)
            assert runtime.agents.get("fan").config["name"] == "ceiling fan"
            check_old_spec(runtime)
            reply = FutureReply()
            runtime.system.tell(AgentActor, ("fan",), UpdateAgent({"device_spec": OLD_SPEC}, reply=reply))
            with pytest.raises(InvalidCommand, match="give telemetry or properties .* not both"):
                reply.get(10)  # the same spec as new input is refused
        finally:
            runtime.close()
    assert unreadable(logs) == []


def test_an_unreadable_spec_is_logged_and_its_agent_has_none(tmp_path: Path) -> None:
    write_old_agents(tmp_path, {"fan": OLD_CONFIG, "broken": {**OLD_CONFIG, "agent_id": "broken",
                                                               "device_spec": CORRUPT_SPEC}})
    reason = ("commands.set_speed.parameters.speed.type: Input should be 'string', 'number', "
              "'integer', 'boolean', 'object' or 'array'")
    for start in ("from the events", "from the view's rows"):
        with structlog.testing.capture_logs() as logs:
            runtime = make_runtime(tmp_path)
            try:
                assert runtime.projections.wait_for(runtime.log.max_position(), 10), start
                broken = runtime.agents.get("broken")
                assert broken is not None and broken.device_spec is None, start
                assert broken.config["device_spec"] == CORRUPT_SPEC  # kept as written
                assert runtime.agents.get("fan").device_spec is not None  # the others load
            finally:
                runtime.close()
        [warning] = unreadable(logs)
        assert warning == {"event": "agents.unreadable_spec", "log_level": "warning",
                           "agent_id": "broken", "reason": reason}, start
