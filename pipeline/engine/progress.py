"""How far a running job is: the console's line per block and MLflow's progress series.

The series is bounded (at most SERIES_POINTS points a run, whatever its size): a point per block
would be 156k MLflow writes at 10M images, a point per image 10M."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SERIES_POINTS = 200


@dataclass
class Progress:
    total_blocks: int
    done_before: int = 0  # finished by an earlier attempt
    started: float = field(default_factory=time.perf_counter)
    blocks: int = 0  # finished in this attempt
    images: int = 0  # inputs of those blocks
    _point: int = -1  # the last series point taken

    def add(self, n_inputs: int) -> None:
        self.blocks += 1
        self.images += n_inputs

    @property
    def finished(self) -> int:
        return self.done_before + self.blocks

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def eta_s(self) -> float | None:
        """Seconds to the last block at this attempt's pace so far; None before the first."""
        if not self.blocks:
            return None
        return (self.total_blocks - self.finished) * self.seconds / self.blocks

    def series_point(self) -> dict[str, float] | None:
        """The MLflow point to log now (keys without a dot: not gated as metrics), or None when
        this block does not reach the next of the run's SERIES_POINTS steps."""
        point = self.finished * SERIES_POINTS // max(self.total_blocks, 1)
        if point <= self._point:
            return None
        self._point = point
        out = {
            "progress_blocks": float(self.finished),
            "progress_images": float(self.images),
            "progress_images_per_s": self.images_per_s,
        }
        if self.eta_s is not None:
            out["progress_eta_s"] = self.eta_s
        return out

    def line(self) -> str:
        eta = "" if self.eta_s is None else f", about {_duration(self.eta_s)} left"
        return f"{self.images} inputs in {self.seconds:.0f} s ({self.images_per_s:.2f}/s){eta}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
