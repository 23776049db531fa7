"""Edges (MQTT, HTTP, CLI) and the composition root. May use every other room."""
