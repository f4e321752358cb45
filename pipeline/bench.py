"""`salient bench`: each method's throughput against the physical bound and against the peers.

A method that needs P forward passes per image cannot beat P / (the model's forward throughput):
we measure that throughput at the same batch size, so `efficiency = bound time / measured time`
says how much of the hardware a method uses. For methods that back-propagate to the input after
every forward (`Explainer.input_gradient`: the gradient family, LRP, DeepLIFT) the bound is the
forward+backward throughput instead (`bound` = "forward+backward"). Peers (Captum,
pytorch-grad-cam) run the same method at the same settings in the same process;
`peer_ratio = ours / peer` images per second.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .explainers import build_explainer
from .explainers.perturb import amp_context
from .models import LoadedModel

# Settings per method that both we and the peer can run; the bench passes them to both sides.
DEFAULT_PARAMS: dict[str, dict] = {
    "integrated_gradients": {"steps": 32},
    "smoothgrad": {"n": 16},
    "scorecam": {"top_k": 128},
    "rise": {"n_masks": 512},
    "glas": {"k": 8},
    "occlusion": {},
}


@dataclass
class BenchRow:
    method: str
    images: int
    images_per_s: float
    passes_per_image: float
    bound_images_per_s: float
    efficiency: float
    peak_memory_mb: float
    batch: int
    device: str
    bound: str = "forward"  # or "forward+backward" (methods with input gradients)
    peer: str | None = None
    peer_images_per_s: float | None = None
    peer_ratio: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def _rate(step: Callable[[], object], batch: int, device: torch.device, repeats: int) -> float:
    """Images per second of `step` (one batch): a warm-up call, then `repeats` timed calls."""
    step()  # warm-up (and compilation)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    return repeats * batch / (time.perf_counter() - t0)


def _probe_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    xb = x[:batch].repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
    return xb.contiguous(memory_format=torch.channels_last)


def forward_throughput(model: LoadedModel, x: torch.Tensor, batch: int, repeats: int = 3) -> float:
    """Images per second of plain inference forwards (channels_last, inference_mode; bf16 and
    compiled when the model's perturbation forwards are)."""
    xb = _probe_batch(x, batch)
    run = model.compiled if model.compiled is not None else model.module
    with torch.inference_mode(), amp_context(model):
        return _rate(lambda: run(xb), batch, model.device, repeats)


def gradient_throughput(model: LoadedModel, x: torch.Tensor, batch: int, repeats: int = 3) -> float:
    """Images per second of a forward and a backward to the input (one target logit each): the
    least any method that needs input gradients must do per pass."""
    xb = _probe_batch(x, batch)

    def step():
        xg = xb.detach().requires_grad_(True)
        torch.autograd.grad(model.module(xg).float().amax(1).sum(), xg)

    with torch.enable_grad():
        return _rate(step, batch, model.device, repeats)


def _time(
    fn: Callable[[torch.Tensor, torch.Tensor], object], x, t, batch, device, rounds: int = 3
) -> float:
    """Images/s of fn over x in batches: one warm-up call (hooks, allocator, kernels), then the
    best of `rounds` passes over x, so a noisy neighbour costs both sides alike."""
    fn(x[:1], t[:1])
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        for s in range(0, len(x), batch):
            fn(x[s : s + batch], t[s : s + batch])
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def _forward_batch(explainer, batch: int) -> int:
    """The batch size the method's forwards actually run at: its perturbation chunk, if any."""
    from .explainers.perturb import default_max_batch

    if getattr(explainer, "default_score", "logit") == "prob" or hasattr(explainer, "max_batch"):
        return getattr(explainer, "max_batch", None) or default_max_batch(explainer.model)
    return batch


def bench(
    model: LoadedModel,
    x: torch.Tensor,
    methods: list[str],
    *,
    batch: int = 8,
    peers: bool = False,
    params: dict[str, dict] | None = None,
    rounds: int = 3,
) -> list[BenchRow]:
    x = x.to(model.device)
    t = model.predict(x)[1][:, 0]
    throughput: dict[tuple[int, bool], float] = {}
    rows = []
    for method in methods:
        p = {**DEFAULT_PARAMS.get(method, {}), **(params or {}).get(method, {})}
        e = build_explainer(method, model, **p)
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(model.device)
        fb = _forward_batch(e, batch)
        key = (fb, bool(e.input_gradient))
        if key not in throughput:
            probe = gradient_throughput if e.input_gradient else forward_throughput
            throughput[key] = probe(model, x, fb)
        before = model.forward_passes
        ips = _time(e, x, t, batch, model.device, rounds=rounds)
        total = model.forward_passes - before
        e(x[:1], t[:1])  # the warm-up image's cost, to take it out of the count
        passes = (total - e.last_forward_passes) / (len(x) * rounds)
        bound = throughput[key] / max(passes, 1e-9)
        row = BenchRow(
            method,
            len(x),
            ips,
            passes,
            bound,
            ips / bound,
            _peak_mb(model.device),
            batch,
            str(model.device),
            "forward+backward" if e.input_gradient else "forward",
        )
        if peers:
            peer = peer_runner(method, model, p)
            if peer is not None:
                row.peer = peer[0]
                row.peer_images_per_s = _time(peer[1], x, t, batch, model.device, rounds=rounds)
                row.peer_ratio = ips / row.peer_images_per_s
        rows.append(row)
    return rows


def peer_runner(method: str, model: LoadedModel, p: dict):
    """(peer name, fn(x, targets)) running the peer's implementation at our settings, or None.
    Peers get the same module (and weights that require grad where they backpropagate)."""
    import copy

    # as a user would hand it to the peer: plain NCHW weights, trainable parameters
    net = copy.deepcopy(model.module).to(memory_format=torch.contiguous_format)
    net.requires_grad_(True)
    if method in ("gradcam", "gradcam_pp", "scorecam"):
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import (
            ClassifierOutputSoftmaxTarget,
            ClassifierOutputTarget,
        )

        from .explainers.layers import resolve_layer

        layer = dict(net.named_modules())[resolve_layer(model, p.get("layer"))[0]]
        cls = {"gradcam": GradCAM, "gradcam_pp": GradCAMPlusPlus, "scorecam": ScoreCAM}[method]
        if method == "scorecam" and p.get("top_k"):
            return None  # the peer has no top-k variant: compare full Score-CAM only
        cam = cls(model=net, target_layers=[layer])
        target = ClassifierOutputSoftmaxTarget if method == "scorecam" else ClassifierOutputTarget
        return "pytorch-grad-cam", lambda x, t: cam(x, targets=[target(int(c)) for c in t])
    if method in ("saliency", "integrated_gradients", "occlusion", "guided_backprop"):
        from captum import attr

        if method == "saliency":
            s = attr.Saliency(net)
            return "captum", lambda x, t: s.attribute(x, target=t, abs=True)
        if method == "guided_backprop":
            g = attr.GuidedBackprop(net)
            return "captum", lambda x, t: g.attribute(x, target=t)
        if method == "integrated_gradients":
            ig = attr.IntegratedGradients(net)
            base = model.preprocess.pixel_value(0.0, model.device)
            steps = p.get("steps", 50)
            return "captum", lambda x, t: ig.attribute(
                x,
                baselines=base.expand_as(x).contiguous(),
                target=t,
                n_steps=steps,
                method="riemann_right",
                internal_batch_size=64,
            )
        if method == "occlusion":
            occ = attr.Occlusion(lambda z: net(z).softmax(-1))
            size = model.input_size
            w = p.get("window") or max(1, round(32 * size / 224))
            stride = p.get("stride") or max(1, round(16 * size / 224))
            grey = model.preprocess.pixel_value(p.get("fill", 0.5), model.device)
            return "captum", lambda x, t: occ.attribute(
                x,
                sliding_window_shapes=(3, w, w),
                strides=(3, stride, stride),
                baselines=grey,
                target=t,
                perturbations_per_eval=64,
            )
    return None


def demo_batch(model: LoadedModel, n: int) -> torch.Tensor:
    """n real photos (scikit-image's, with varied crops) in the model's input space."""
    from skimage import data

    photos = [getattr(data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")]
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        dy, dx = (i // len(photos)) * 7 % (h // 5), (i // len(photos)) * 11 % (w // 5)
        crops.append(img[dy:, dx:])
    return model.preprocess(crops)


def as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def bench_pipeline(spec, address: str | None = None) -> dict:
    """The Ray job's images/s against the same explainers in this process on the same images.

    In-process: decode everything first, then time only the model work (prediction + every
    explainer), which is the most the job could reach. Job: compute time of a fresh run (Ray
    start excluded, decoding, actors and writing included)."""
    import time as _time

    from .engine.job import init_ray, plan_blocks, run_job
    from .engine.worker import build_explainers, load_job_model
    from .sources.reader import read_block

    model = load_job_model(spec.model, spec.compute.device, spec.tracking.uri)
    blocks = plan_blocks(spec)
    pixels = [
        read_block(b, model.preprocess, endpoint_url=spec.storage.endpoint_url)["pixels"]
        for b in blocks
    ]
    x = model.preprocess.normalise(torch.from_numpy(np.concatenate(pixels)))
    explainers = build_explainers(model, spec.explainers, spec.compute.max_batch, spec.seed)
    bs = spec.compute.batch_size
    t0 = _time.perf_counter()
    for s in range(0, len(x), bs):
        xb = x[s : s + bs].to(model.device)
        t = model.predict(xb)[1][:, 0]
        for e in explainers.values():
            e(xb, t)
    _sync(model.device)
    in_process = len(x) / (_time.perf_counter() - t0)
    fresh = spec.model_copy(
        update={
            "run_id": f"bench-{int(_time.time())}",
            "output": spec.output.model_copy(update={"overwrite": "replace"}),
        }
    )
    markers: list[dict] = []

    def progress(marker, done, total):
        markers.append(marker)

    init_ray(address)  # once per cluster, not per job: outside the timed run
    submitted = _time.time()
    job = run_job(fresh, address=address, progress=progress)
    ray_ips = job.summary["images_per_s"]
    # steady state, by the actors' own clocks: from the first block's end to the last block's
    # end, so Ray's and the actors' start-up and the first block's warm-up are left out
    ends = sorted((m["started_at"] + m["wall_seconds"], m["n_inputs"]) for m in markers)
    steady = None
    if len(ends) >= 3:
        steady = sum(n for _, n in ends[1:]) / (ends[-1][0] - ends[0][0])
    return {
        "images": len(x),
        "in_process_images_per_s": in_process,
        "ray_images_per_s": ray_ips,
        "ratio": ray_ips / in_process,
        "ray_steady_images_per_s": steady,
        "steady_ratio": steady / in_process if steady else None,
        # job submitted -> first block started: tracking set-up, actor start, imports, model load
        "startup_seconds": min(m["started_at"] for m in markers) - submitted if markers else None,
        "run_id": job.run_id,
    }
