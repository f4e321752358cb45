"""Random draws that depend on the image, not on the batch around it."""

from __future__ import annotations

import hashlib

import torch


def image_seeds(x: torch.Tensor, seed: int) -> list[int]:
    """A seed per image from its content and the run's seed."""
    host = x.detach().float().cpu().contiguous().numpy()
    seeds = []
    for img in host:
        h = hashlib.blake2b(img.tobytes(), digest_size=8, key=str(seed).encode())
        seeds.append(int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return seeds


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
