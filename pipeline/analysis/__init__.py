"""Analyses over a finished run's tables (read through the run store, written beside the run)."""
