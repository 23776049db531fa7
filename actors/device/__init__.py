from actors.device.actor import DeviceActor
from actors.device.aggregate import Device
from actors.device.messages import (
    AnswerRefused,
    CatchUp,
    CommandSettled,
    DeviceResponded,
    ExpireLiveness,
    ReportEvent,
    ReportTelemetry,
    SendCommand,
    Wake,
)

__all__ = ["AnswerRefused", "CatchUp", "CommandSettled", "Device", "DeviceActor", "DeviceResponded", "ExpireLiveness", "ReportEvent",
           "ReportTelemetry", "SendCommand", "Wake"]
