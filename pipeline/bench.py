"""`salient bench`: each method's throughput against the physical bound and against the peers.

A method cannot beat the forwards it runs. The bench records every forward a method makes during
a timed pass (rows, input size, plain or perturbation path, bf16 autocast, and whether a backward
to the input follows: `Explainer.input_gradient` with autograd on), times each distinct kind of
forward alone (warm, best of several calls, interleaved with the method's rounds), and sums those
times over the recorded forwards: that is the bound time, so `efficiency = bound time / measured
time` <= 1 up to timing noise. Above `EFFICIENCY_LIMIT` the probe, not the method, is wrong, and
the row says so (`warning`). `bound` is "forward+backward" when any recorded forward is followed
by a backward to the input (the gradient family, LRP, DeepLIFT), else "forward".

Peers (Captum, pytorch-grad-cam) run the same method at the same settings in the same process,
in rounds interleaved with ours (ours, peer, ours, peer, ...) so that drift in machine load hits
both alike; `peer_ratio` is the median over rounds of (peer seconds / our seconds), i.e. ours /
peer images per second, with the per-round minimum and maximum beside it.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .chunks import chunks
from .explainers import build_explainer
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

# Efficiency above this is not a fast method but a bound that is not one (timing noise aside).
EFFICIENCY_LIMIT = 1.1


@dataclass(frozen=True)
class Forward:
    """One kind of forward a method ran: what the bound probe has to reproduce."""

    rows: int
    height: int
    width: int
    perturbed: bool = False  # through `forward_perturbed` (the compiled module, if any)
    backward: bool = False  # followed by a backward to the input
    autocast: bool = False  # under bf16 autocast


@dataclass
class BenchRow:
    method: str
    images: int
    images_per_s: float  # best round
    passes_per_image: float
    bound_images_per_s: float
    efficiency: float
    peak_memory_mb: float
    batch: int
    device: str
    bound: str = "forward"  # or "forward+backward" (methods with input gradients)
    peer: str | None = None
    peer_images_per_s: float | None = None  # best round
    peer_ratio: float | None = None  # median over rounds of ours / peer images per second
    peer_ratio_min: float | None = None
    peer_ratio_max: float | None = None
    rounds: int = 0
    round_seconds: list[float] = field(default_factory=list)  # ours, one pass over the images
    peer_round_seconds: list[float] | None = None
    # the forwards of one pass, by kind, with the best seconds per call the probe measured
    forwards: list[dict] = field(default_factory=list)
    warning: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def _seconds(step: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def _probe_batch(x: torch.Tensor, rows: int, size: tuple[int, int]) -> torch.Tensor:
    """`rows` of the bench's own images (repeated), at `size`, channels_last."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    xb = x.repeat((rows + len(x) - 1) // len(x), 1, 1, 1)[:rows]
    return xb.contiguous(memory_format=torch.channels_last)


def probe_step(model: LoadedModel, x: torch.Tensor, f: Forward) -> Callable[[], object]:
    """One forward of kind `f` and nothing else (plus the backward to the input, if `f` has
    one): the least a method that ran such a forward paid for it."""
    xb = _probe_batch(x, f.rows, (f.height, f.width))
    run = model.perturbed_module if f.perturbed else model.module
    kind = model.device.type

    def amp():
        return torch.autocast(kind, dtype=torch.bfloat16) if f.autocast else nullcontext()

    if not f.backward:

        def step():
            with torch.inference_mode(), amp():
                return run(xb)

        return step

    def step_fb():
        with torch.enable_grad():
            xg = xb.detach().requires_grad_(True)
            with amp():
                out = run(xg)
            return torch.autograd.grad(out.float().amax(1).sum(), xg)  # one logit per row

    return step_fb


class BoundProbe:
    """Best seconds per call of each kind of forward, measured warm, `reps` calls in a row per
    round (the method's own stream runs same-shaped forwards back to back, too)."""

    def __init__(self, model: LoadedModel, x: torch.Tensor, reps: int = 3):
        self.model, self.x, self.reps = model, x, reps
        self.best: dict[Forward, float] = {}
        self.steps: dict[Forward, Callable[[], object]] = {}

    def round(self, forwards: list[Forward]) -> None:
        for f in dict.fromkeys(forwards):  # distinct kinds, in the order the method ran them
            if f not in self.steps:
                self.steps[f] = probe_step(self.model, self.x, f)
                self.steps[f]()  # warm-up: allocator, kernels, compilation
                self.best[f] = float("inf")
            for _ in range(self.reps):
                self.best[f] = min(self.best[f], _seconds(self.steps[f], self.model.device))

    def seconds(self, forwards: list[Forward]) -> float:
        return sum(self.best[f] for f in forwards)


@contextmanager
def recording_forwards(model: LoadedModel, input_gradient: bool, log: list[Forward]):
    """Append a `Forward` to `log` for every batch that goes through `model.forward` or
    `model.forward_perturbed` while the block runs."""
    cls = type(model)
    inside = [False]  # forward_perturbed falls back on forward: count that batch once

    def note(x: torch.Tensor, perturbed: bool) -> None:
        log.append(
            Forward(
                x.shape[0],
                x.shape[2],
                x.shape[3],
                perturbed,
                input_gradient and torch.is_grad_enabled(),
                torch.is_autocast_enabled(model.device.type),
            )
        )

    def forward(x):
        if not inside[0]:
            note(x, False)
        return cls.forward(model, x)

    def forward_perturbed(x):
        note(x, True)
        inside[0] = True
        try:
            return cls.forward_perturbed(model, x)
        finally:
            inside[0] = False

    model.forward, model.forward_perturbed = forward, forward_perturbed
    try:
        yield log
    finally:
        del model.forward, model.forward_perturbed


def _recorded(model: LoadedModel, explainer, log: list[Forward]):
    """The explainer as fn(x, targets), logging its forwards. Rows it counts in
    `model.forward_passes` without going through the model's forwards (DeepLIFT and LRP run a
    rewritten copy of the module) are logged as one forward of that many rows."""

    def fn(x, t):
        before, logged = model.forward_passes, len(log)
        with recording_forwards(model, bool(explainer.input_gradient), log):
            explainer(x, t)
        unseen = model.forward_passes - before - sum(f.rows for f in log[logged:])
        if unseen > 0:
            log.append(Forward(unseen, x.shape[2], x.shape[3], False, explainer.input_gradient))

    return fn


def _one_pass(fn, x: torch.Tensor, t: torch.Tensor, batch: int) -> None:
    for part in chunks(len(x), batch):
        fn(x[part], t[part])


def bench_method(
    model: LoadedModel,
    x: torch.Tensor,
    t: torch.Tensor,
    method: str,
    explainer,
    *,
    batch: int = 8,
    rounds: int = 3,
    peer: tuple[str, Callable] | None = None,
    probe_reps: int = 3,
) -> BenchRow:
    """Time `explainer` over x (in batches) against its bound and, if given, the peer.

    One warm-up batch per side, then `rounds` rounds of: our pass over x (its forwards
    recorded), the peer's pass, the bound probe of the forwards our pass ran."""
    rounds = max(1, rounds)
    device = model.device
    ours_log: list[list[Forward]] = []
    ours = _recorded(model, explainer, [])
    ours(x[:batch], t[:batch])  # warm-up (hooks, allocator, kernels)
    if peer is not None:
        peer[1](x[:batch], t[:batch])
    probe = BoundProbe(model, x, reps=probe_reps)
    ours_s: list[float] = []
    peer_s: list[float] = []
    peak = 0.0
    for _ in range(rounds):
        log: list[Forward] = []
        fn = _recorded(model, explainer, log)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ours_s.append(_seconds(lambda fn=fn: _one_pass(fn, x, t, batch), device))
        # CUDA: ours alone (reset above, read before the peer runs). CPU: the process's RSS
        # high-water mark, which no API resets, so it includes every earlier method and peer
        peak = max(peak, _peak_mb(device))
        ours_log.append(log)
        if peer is not None:
            peer_s.append(_seconds(lambda: _one_pass(peer[1], x, t, batch), device))
        probe.round(log)
    forwards = ours_log[0]
    bound_s = probe.seconds(forwards)
    best = min(ours_s)
    counts = Counter(forwards)
    row = BenchRow(
        method,
        len(x),
        len(x) / best,
        sum(f.rows for f in forwards) / len(x),
        len(x) / bound_s,
        bound_s / best,
        peak,
        batch,
        str(device),
        "forward+backward" if any(f.backward for f in forwards) else "forward",
        rounds=rounds,
        round_seconds=ours_s,
        forwards=[
            {**asdict(f), "count": n, "best_seconds": probe.best[f]} for f, n in counts.items()
        ],
    )
    if peer is not None:
        ratios = [p / o for o, p in zip(ours_s, peer_s, strict=True)]
        row.peer = peer[0]
        row.peer_images_per_s = len(x) / min(peer_s)
        row.peer_ratio = statistics.median(ratios)
        row.peer_ratio_min, row.peer_ratio_max = min(ratios), max(ratios)
        row.peer_round_seconds = peer_s
    if row.efficiency > EFFICIENCY_LIMIT:
        row.warning = (
            f"{method}: efficiency {row.efficiency:.2f} > {EFFICIENCY_LIMIT}: the method beat "
            "its own bound, so the bound probe is wrong (not the method fast)"
        )
    return row


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
    rows = []
    for method in methods:
        p = {**DEFAULT_PARAMS.get(method, {}), **(params or {}).get(method, {})}
        e = build_explainer(method, model, **p)
        peer = peer_runner(method, model, p) if peers else None
        rows.append(bench_method(model, x, t, method, e, batch=batch, rounds=rounds, peer=peer))
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
    from .storage import Storage

    model = load_job_model(spec.model, spec.compute.device, spec.tracking.uri)
    blocks = plan_blocks(spec)
    storage = Storage.from_spec(spec.storage)
    pixels = [read_block(b, model.preprocess, storage=storage)["pixels"] for b in blocks]
    x = model.preprocess.normalise(torch.from_numpy(np.concatenate(pixels)))
    explainers = build_explainers(model, spec.explainers, spec.compute.max_batch, spec.seed)
    bs = spec.compute.batch_for(model.device)
    t0 = _time.perf_counter()
    for part in chunks(len(x), bs):
        xb = x[part].to(model.device)
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
    markers: list = []  # BlockMarker

    def progress(marker, state):
        markers.append(marker)

    init_ray(address)  # once per cluster, not per job: outside the timed run
    submitted = _time.time()
    job = run_job(fresh, address=address, progress=progress)
    ray_ips = job.summary["images_per_s"]
    # steady state, by the actors' own clocks: from the first block's end to the last block's
    # end, so Ray's and the actors' start-up and the first block's warm-up are left out
    ends = sorted((m.started_at + m.wall_seconds, m.n_inputs) for m in markers)
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
        "startup_seconds": min(m.started_at for m in markers) - submitted if markers else None,
        "run_id": job.run_id,
    }
