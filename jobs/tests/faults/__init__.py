"""Fault tests: real scheduler processes through kill -9, SIGSTOP, database outages and held locks."""
