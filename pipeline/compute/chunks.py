"""The one chunking helper: every loop that cuts n items into batches goes through here.

`chunk_ranges` gives the index ranges; `run_in_chunks` calls a function on each and, when a chunk
raises, retries its items one by one, so one bad item does not take its neighbours down. (The
perturbed-forward core has its own loop because it halves a chunk on out-of-memory and mixes
copies of several images in one forward.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def chunk_ranges(n: int, size: int) -> Iterator[torch.Tensor]:
    """[0, n) as consecutive index tensors of at most `size` (a size < 1 counts as 1)."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


def run_in_chunks(fn: Callable[[torch.Tensor], None], n: int, size: int) -> dict[int, Exception]:
    """fn(idx) for each chunk of [0, n); a chunk that raises is retried item by item. Returns
    item -> the exception it still raised alone (empty when everything ran). `fn` writes its
    results itself (into preallocated outputs), so a retried item overwrites nothing else."""
    failed: dict[int, Exception] = {}
    for idx in chunk_ranges(n, size):
        try:
            fn(idx)
        except Exception as e:
            if len(idx) == 1:
                failed[int(idx[0])] = e
                continue
            for j in idx.tolist():
                try:
                    fn(torch.tensor([j]))
                except Exception as e:
                    failed[j] = e
    return failed
