"""Project scripts run by the Makefile (each also importable, for its tests)."""
