"""Fault suite: the real stack on loopback under load, with its parts killed and restarted."""
