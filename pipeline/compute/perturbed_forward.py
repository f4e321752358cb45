"""The perturbed-forward core: many perturbed copies of many images through the model, in chunks.

Every method that scores perturbed inputs (Score-CAM, RISE, GLAS, occlusion, EVET's filter, the
faithfulness metrics) goes through `perturbed_scores`; there is no second copy of this loop.
Copies are made on the device, chunk by chunk, by a `make` callable, so a stack of K masks for
B images never has to exist in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from ..models.loaded import LoadedModel

# (image index, copy index) -> perturbed inputs [len, 3, H, W] in model space
MakeCopies = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (image index, copy index, scores) of one finished chunk -> None (for streaming accumulators)
OnChunk = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def default_max_batch(model: LoadedModel) -> int:
    """Copies per forward: large on accelerators, moderate on CPU where cache matters more."""
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        # ~12 MB of activations per 224px image for mid-size CNNs in bf16, with headroom
        per_image = 12e6 * (model.input_size / 224) ** 2
        return int(max(32, min(1024, free * 0.5 / per_image)))
    return 64


def amp_context(model: LoadedModel):
    """bf16 autocast for perturbation forwards where the model asks for it (CUDA by default, CPU
    with `autocast_cpu`); a no-op context otherwise."""
    kind = model.device.type
    policy = model.policy
    if (kind == "cuda" and policy.autocast) or (kind == "cpu" and policy.autocast_cpu):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return nullcontext()


def perturbed_scores(
    model: LoadedModel,
    targets: torch.Tensor,
    copies_per_image: int,
    make: MakeCopies,
    *,
    score: str = "prob",
    max_batch: int | None = None,
    autocast: bool = True,
    on_chunk: OnChunk | None = None,
) -> torch.Tensor:
    """Score of each image's target on each of its perturbed copies -> [B, copies_per_image].

    The flat index space (image, copy) is cut into chunks of at most `max_batch` rows, so one
    forward mixes copies of several images. The forwards run under bf16 autocast where the model
    asks for it (`amp_context`) unless `autocast=False`. A chunk that runs out of GPU memory is
    halved and retried, and the model remembers the size that fit (`model.max_batch_cap`), so
    later calls start there.

    `on_chunk(img, copy, scores)` is called once per finished chunk, so a method can fold each
    chunk into a running sum (RISE: sum_i score_i * M_i) while the chunk's masks still exist,
    instead of regenerating them in a second loop.
    """
    b = targets.shape[0]
    total = b * copies_per_image
    out = torch.empty(total, device=model.device, dtype=torch.float32)
    chunk = min(max_batch or default_max_batch(model), model.max_batch_cap or total)
    amp = amp_context(model) if autocast else nullcontext()
    start = 0
    with torch.inference_mode():
        while start < total:
            flat = torch.arange(start, min(start + chunk, total), device=model.device)
            img, k = flat // copies_per_image, flat % copies_per_image
            try:
                with amp:
                    logits = model.forward_perturbed(make(img, k))
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise
                chunk = max(1, chunk // 2)
                model.max_batch_cap = chunk
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            logits = model.class_scores(logits) if score == "prob" else logits.float()
            chunk_scores = logits.gather(1, targets[img][:, None])[:, 0]
            out[flat] = chunk_scores
            if on_chunk is not None:
                on_chunk(img, k, chunk_scores)
            start += len(flat)
    return out.view(b, copies_per_image)


def blend(
    x: torch.Tensor, masks: torch.Tensor, img: torch.Tensor, baseline: torch.Tensor
) -> torch.Tensor:
    """x[img] * m + baseline * (1 - m): keep where the mask is 1, show the baseline elsewhere.

    masks [n,1|3,H,W] for the rows `img`; baseline broadcastable to x ([1,3,1,1] or [B,3,H,W]).
    """
    base = baseline[img] if baseline.shape[0] == x.shape[0] and baseline.shape[0] > 1 else baseline
    return x[img] * masks + base * (1 - masks)
