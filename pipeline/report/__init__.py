"""Rendering: overlays now; the HTML report builds on them."""

from .overlay import normalise_for_display, overlay

__all__ = ["normalise_for_display", "overlay"]
