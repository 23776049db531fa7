"""`--demo`: the seed's thermostat agent, created if it does not exist yet."""

from __future__ import annotations

from actors.agent import AgentActor, AgentConfig, CreateAgent
from actors.errors import AgentAlreadyExists
from actors.ports import FutureReply
from gateways.runtime import Runtime

THERMOSTAT = {
    "agent_id": "thermostat",
    "name": "Thermostat",
    "agent_type": "single",
    "voice_type": "default",
    "is_custom_agent": False,
    "sys_prompt": "You are a smart thermostat assistant. Report temperature and humidity, and set the target temperature when asked.",
    "welcome_message": "Hi! I'm your thermostat.",
    "device_spec": {
        "name": "Smart Thermostat",
        "description": "A thermostat with temperature and humidity sensors.",
        "commands": {
            "set_target_temperature": {
                "description": "Set the target temperature in degrees Celsius.",
                "parameters": {
                    "target_temperature": {"type": "number", "description": "Target temperature (°C)", "required": True},
                },
            },
        },
        "telemetry": {
            "temperature": {"type": "number", "description": "Current temperature (°C)", "defaultValue": 22},
            "humidity": {"type": "number", "description": "Relative humidity (%)", "defaultValue": 50},
            "mode": {"type": "string", "description": "auto, heat or cool", "defaultValue": "auto"},
        },
        "events": {
            "temperature_alert": {
                "description": "Temperature outside the safe range.",
                "eventType": "alert",
                "outputData": {"temperature": {"type": "number"}, "level": {"type": "string"}},
            },
        },
    },
}


def ensure_demo_agent(runtime: Runtime) -> bool:
    """Create the thermostat agent unless it exists. Blocking: call from a thread."""
    if runtime.agents.get("thermostat") is not None:
        return False
    config = AgentConfig.model_validate(THERMOSTAT).to_record()
    reply = FutureReply()
    runtime.system.tell(AgentActor, ("thermostat",), CreateAgent(config, reply=reply))
    try:
        position = reply.get(10)
    except AgentAlreadyExists:
        return False
    runtime.projections.wait_for(position, 10)
    return True
