"""Salient: explain image classifiers at dataset scale."""

__version__ = "0.1.0"
