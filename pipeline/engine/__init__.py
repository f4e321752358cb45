"""Execution: the in-process path (local.py) and the Ray Data job."""
