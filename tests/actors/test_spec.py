"""DeviceSpec: the format REFERENCE.md gives, checked when a spec is written."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from actors.errors import InvalidCommand
from actors.spec import DeviceSpec, error_summary, pydantic_message

SPEC: dict[str, Any] = {
    "name": "Lamp",
    "commands": {
        "set_mode": {"description": "Mode.", "parameters": {
            "mode": {"type": "string", "description": "", "required": True, "enum": ["on", "off"]},
            "level": {"type": "integer", "description": "", "required": False},
        }},
    },
    "telemetry": {"brightness": {"type": "number", "description": "", "defaultValue": 0}},
    "events": {"overheat": {"description": "", "eventType": "alert", "outputData": {}}},
}


def test_reads_back_as_written() -> None:
    # `enum?`: a parameter without one reads back without one (not "enum": null).
    dumped = DeviceSpec.model_validate(SPEC).model_dump(mode="json")
    assert dumped["commands"] == SPEC["commands"]
    assert "enum" not in dumped["commands"]["set_mode"]["parameters"]["level"]
    assert DeviceSpec.model_validate(dumped).model_dump(mode="json") == dumped


def test_older_properties_key_is_telemetry() -> None:
    old = {k: v for k, v in SPEC.items() if k != "telemetry"} | {"properties": SPEC["telemetry"]}
    spec = DeviceSpec.model_validate(old)
    assert set(spec.telemetry) == {"brightness"}
    assert "properties" not in spec.model_dump(mode="json")


@pytest.mark.parametrize("change, where, message", [
    ({"properties": {"b": {}}}, (), "give telemetry or properties (its older name), not both"),
    ({"commands": {"c": {"parameters": {"p": {"type": "integer", "enum": ["x"]}}}}},
     ("commands", "c", "parameters", "p"), "enum value 'x' is not of type integer"),
    ({"commands": {"c": {"parameters": {"p": {"type": "boolean", "enum": [1]}}}}},
     ("commands", "c", "parameters", "p"), "enum value 1 is not of type boolean"),
    ({"commands": {"c": {"parameters": {"p": {"required": "yes"}}}}},
     ("commands", "c", "parameters", "p", "required"), "Input should be a valid boolean"),
    ({"commands": {"c": {"parameters": {"p": {"type": "float"}}}}},
     ("commands", "c", "parameters", "p", "type"), "Input should be 'string', 'number', 'integer', "
                                                   "'boolean', 'object' or 'array'"),
    ({"events": {"e": {"eventType": "warning"}}}, ("events", "e", "eventType"), "Input should be 'alert' or 'info'"),
])
def test_refuses_a_spec_no_device_could_use(change: dict[str, Any], where: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        DeviceSpec.model_validate({**SPEC, **change})
    [error] = caught.value.errors()
    assert error["loc"] == where
    assert error["msg"].removeprefix("Value error, ") == message


def test_messages_show_values_as_json_writes_them() -> None:
    """A client sent JSON: its `true` and `null` are named so, not as Python's True and None,
    and a wrong shape is "a JSON object", not "a valid dictionary or instance of Command"."""
    spec = DeviceSpec.model_validate({**SPEC, "commands": {"set": {"parameters": {
        "n": {"type": "number"}, "s": {"type": "string"}, "m": {"type": "string", "enum": ["a", "b"]}}}}})
    for params, message in [({"n": True}, "n: true is not of type 'number'"),
                            ({"s": None}, "s: null is not of type 'string'"),
                            ({"n": [True, None]}, "n: [true, null] is not of type 'number'"),
                            ({"n": {"a": False}}, 'n: {"a": false} is not of type \'number\''),
                            ({"m": True}, "m: true is not of type 'string'; m: true is not one of ['a', 'b']")]:
        with pytest.raises(InvalidCommand) as caught:
            spec.check_command("set", params)
        assert str(caught.value) == f"invalid params for 'set': {message}"
    with pytest.raises(ValidationError) as refused:
        DeviceSpec.model_validate({**SPEC, "commands": {"c": {"parameters": {"p": {"type": "integer", "enum": [True]}}}}})
    assert "enum value true is not of type integer" in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        DeviceSpec.model_validate({**SPEC, "commands": {"c": "not an object"}})
    assert [pydantic_message(e) for e in refused.value.errors()] == ["Input should be a JSON object"]
    assert error_summary(refused.value) == "commands.c: Input should be a JSON object"


def test_checks_commands_against_the_spec() -> None:
    spec = DeviceSpec.model_validate(SPEC)
    spec.check_command("set_mode", {"mode": "on", "level": 3})
    with pytest.raises(InvalidCommand, match="mode: 'dim' is not one of"):
        spec.check_command("set_mode", {"mode": "dim"})
    with pytest.raises(InvalidCommand, match="'mode' is a required property"):
        spec.check_command("set_mode", {})
    with pytest.raises(InvalidCommand, match=r"unknown command 'explode' \(this product's commands: set_mode\)"):
        spec.check_command("explode", {})


@pytest.mark.parametrize("change, good, bad, message", [
    ({"properties": {"b": {}}}, ("set_mode", {"mode": "on"}), ("set_mode", {"mode": "dim"}),
     "mode: 'dim' is not one of"),
    ({"commands": {"c": {"parameters": {"p": {"type": "integer", "enum": [1, "max"]}}}}},
     ("c", {"p": 1}), ("c", {"p": "max"}), "p: 'max' is not of type 'integer'"),
    ({"commands": {"c": {"parameters": {"p": {"type": "boolean", "enum": [1]}}}}},
     ("c", {}), ("c", {"p": 1}), "p: 1 is not of type 'boolean'"),
    ({"commands": {"c": {"parameters": {"p": {"required": "yes"}}}}},
     ("c", {"p": "x"}), ("c", {}), "'p' is a required property"),
], ids=["telemetry and properties", "enum of mixed types", "enum of another type", "lax bool"])
def test_a_stored_spec_older_versions_accepted_loads_as_written(
        change: dict[str, Any], good: tuple[str, dict[str, Any]], bad: tuple[str, dict[str, Any]],
        message: str) -> None:
    """Input rules are for input: a spec read back from the log or the views is not refused
    for what an older version accepted (3872f37 stored all of these), and commands are
    checked against what can be checked."""
    with pytest.raises(ValidationError):
        DeviceSpec.model_validate({**SPEC, **change})
    spec = DeviceSpec.stored({**SPEC, **change})
    dumped = spec.model_dump(mode="json")
    assert DeviceSpec.stored(dumped).model_dump(mode="json") == dumped
    assert set(spec.telemetry) == {"brightness"}  # `telemetry` wins; `properties` is kept as written
    assert dumped.get("properties") == change.get("properties")
    spec.check_command(*good)
    with pytest.raises(InvalidCommand, match=message):
        spec.check_command(*bad)


@pytest.mark.parametrize("change", [
    {"commands": {"c": {"parameters": {"p": {"type": "float"}}}}},
    {"events": {"e": {"eventType": "warning"}}},
    {"commands": "set_mode"},
])
def test_a_stored_spec_no_version_accepted_is_still_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DeviceSpec.stored({**SPEC, **change})
