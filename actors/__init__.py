"""Actors: one per device, agent (and later session), state rebuilt from the log."""
