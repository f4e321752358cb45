"""The one chunking helper: every loop that cuts n items into batches goes through here
(images into model batches, plan blocks into writes, objects into delete calls, MLflow
entities into requests).

`chunks` gives the ranges as slices (they index lists, Arrow tables and tensors alike, and a
tensor slice is a view); `run_in_chunks` calls a function on each and, when a chunk raises,
retries its items one by one, so one bad item does not take its neighbours down. (The
perturbed-forward core has its own loop because it halves a chunk on out-of-memory and mixes
copies of several images in one forward.) It imports nothing from the package: every layer
may use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


def chunks(n: int, size: int) -> Iterator[slice]:
    """[0, n) as consecutive slices of at most `size` items (a size < 1 counts as 1)."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def run_in_chunks(fn: Callable[[slice], None], n: int, size: int) -> dict[int, Exception]:
    """fn(chunk) for each chunk of [0, n); a chunk that raises is retried item by item.
    Returns item -> the exception it still raised alone (empty when everything ran). `fn`
    writes its results itself (into preallocated outputs), so a retried item overwrites
    nothing else."""
    failed: dict[int, Exception] = {}
    for part in chunks(n, size):
        try:
            fn(part)
        except Exception as e:
            if part.stop - part.start == 1:
                failed[part.start] = e
                continue
            for j in range(part.start, part.stop):
                try:
                    fn(slice(j, j + 1))
                except Exception as e:
                    failed[j] = e
    return failed
