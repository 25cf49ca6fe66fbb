"""Checkpoint formats: the registry (``detect`` / ``open``), the native format and foreign readers."""
