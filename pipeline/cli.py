"""The `salient` command line."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import cluster

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no table-creation lines on the console

app = typer.Typer(
    help="Salient: explain image classifiers at dataset scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)  # a path or a long line is never cut in two
errors = Console(stderr=True, soft_wrap=True)  # one line per error, never wrapped

DEMO_IMAGES = ("chelsea", "coffee", "astronaut", "rocket")


def _fail(message: str, code: int = 2) -> None:
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def parse_params(items: list[str], methods: list[str]) -> dict[str, dict]:
    """["gradcam.layer=bn2", "rise.n=500"] -> {"gradcam": {"layer": "bn2"}, "rise": {"n": 500}}."""
    params: dict[str, dict] = {m: {} for m in methods}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"--param {item!r}: expected METHOD.NAME=VALUE")
        if method not in params:
            raise ValueError(f"--param {item!r}: method {method!r} is not among --method")
        params[method][name] = yaml.safe_load(value)
    return params


@app.command()
def explain(
    images: list[str] = typer.Argument(
        ..., help="Image files, folders (every image in them) or globs; any fsspec URI."
    ),
    method: list[str] = typer.Option(["gradcam"], "--method", "-m", help="Explainer; repeatable."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Folder for overlays and maps."),
    model: str = typer.Option("builtin:efficientnet-lite0", help="Model URI."),
    weights: str | None = typer.Option(None, help="State dict for torchvision:/timm: models."),
    target: str | None = typer.Option(
        None, help="Class index or name (any case); default: predicted."
    ),
    param: list[str] = typer.Option([], "--param", "-p", help="METHOD.NAME=VALUE; repeatable."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ...; default: best available."),
    trust_pickle: bool = typer.Option(False, help="Allow pickle: model URIs (runs their code)."),
    batch_size: int = typer.Option(16, min=1, help="Images per forward batch."),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Allow a torchvision:/timm: architecture without weights (random init, on purpose).",
    ),
) -> None:
    """Explain images on this machine: one PNG overlay and one .npy map per image and method,
    named <name>.<method>.t<target>; unreadable images are skipped with one line each."""
    from .engine.local import expand_inputs, explain_files

    def skipped(message: str) -> None:
        errors.print(f"[yellow]skipped[/yellow] {escape(message)}", highlight=False)

    try:
        params = parse_params(param, method)
        rows = explain_files(
            expand_inputs(images, exclude=out),
            method,
            out,
            on_skip=skipped,
            model_uri=model,
            weights=weights,
            target=target,
            params=params,
            device=device,
            trust_pickle=trust_pickle,
            random_init=random_weights,
            batch_size=batch_size,
        )
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError) as e:
        _fail(str(e))
    _print_rows(rows, out)


@app.command(name="methods")
def methods_command() -> None:
    """List every explainer and metric with its parameters and their defaults."""
    import inspect

    from .explainers import EXPLAINERS, explainer_params
    from .metrics import METRICS, metric_params

    def described(cls, params: dict[str, inspect.Parameter]) -> str:
        shown = []
        for name, p in params.items():
            if p.kind == p.VAR_KEYWORD:
                shown.append(f"**{name}")
            elif p.default is p.empty:
                shown.append(f"{name} (required)")
            elif name == "score" and p.default is None:
                # None stands for the class's own default: show what it resolves to
                shown.append(f"score={cls.default_score!r}")
            else:
                shown.append(f"{name}={p.default!r}")
        return ", ".join(shown) or "(no parameters)"

    def summary(cls, width: int = 160) -> str:
        """The docstring's first paragraph (where the cost and signedness are stated), cut."""
        text = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        return text if len(text) <= width else text[:width].rsplit(" ", 1)[0] + " ..."

    def show(name: str, tags: str, cls, params) -> None:
        console.print(f"  {name}  [{tags}]  {described(cls, params)}", **plain)
        if doc := summary(cls):
            console.print(f"      {doc}", **plain)

    plain = {"markup": False, "highlight": False, "soft_wrap": True}
    console.print(
        "Explainers  (salient explain -m NAME -p NAME.PARAM=VALUE; spec: explainers[].params)",
        **plain,
    )
    for name in sorted(EXPLAINERS):
        cls = EXPLAINERS[name]
        show(name, "signed" if cls.signed else ">= 0", cls, explainer_params(name))
    console.print("Metrics  (spec: metrics[].params)", **plain)
    for name in sorted(METRICS):
        cls = METRICS[name]
        tags = f"{'higher' if cls.higher_is_better else 'lower'} is better, needs {cls.needs}"
        show(name, tags, cls, metric_params(name))


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o"),
    method: list[str] = typer.Option(
        ["gradcam", "gradcam_pp", "saliency", "fem"], "--method", "-m", help="Repeatable."
    ),
) -> None:
    """Explain the real photos that ship inside scikit-image with the builtin model."""
    from skimage import data

    from .engine.local import explain_images

    t0 = time.perf_counter()
    images = [getattr(data, name)() for name in DEMO_IMAGES]
    rows = explain_images(images, list(DEMO_IMAGES), method, out)
    _print_rows(rows, out)
    seconds = time.perf_counter() - t0
    console.print(f"{len(images)} images x {len(method)} methods in {seconds:.1f} s")


@app.command()
def validate(
    spec: str = typer.Argument(..., help="Job spec (YAML), local path or URI."),
    for_cluster: bool = typer.Option(
        False,
        "--cluster",
        help="The spec runs on a remote cluster: a loopback storage endpoint or a relative "
        "sqlite tracking store is an error, not a warning.",
    ),
) -> None:
    """Check a job spec as `run` would before starting Ray: the schema, the model (loaded on
    the CPU), every explainer and metric built with its parameters, the source and the ground
    truth the metrics and targets need. Writes nothing. Exit 2 with one line per problem.
    What would fail on a cluster (see --cluster) is a warning."""
    from .engine.preflight import preflight
    from .spec import SpecError, cluster_problems, load_spec

    try:
        job = load_spec(spec)
        local_only = cluster_problems(load_spec(spec, resolve_paths=False))  # as written
        problems = [f"{spec}: {p}" for p in local_only] if for_cluster else []
        try:
            preflight(job, where=spec)
        except SpecError as e:
            problems.append(str(e))
        if problems:  # all of them together, the cluster's first
            raise SpecError("\n".join(problems))
    except SpecError as e:
        _fail(str(e))
    for line in local_only:
        errors.print(f"[yellow]warning:[/yellow] {escape(spec)}: {escape(line)}", highlight=False)
    names = ", ".join(m.key for m in job.explainers)
    console.print(
        f"{spec}: ok ({len(job.explainers)} explainers: {names}; {len(job.metrics)} metrics)",
        highlight=False,
    )


@app.command()
def run(
    spec: str = typer.Argument(..., help="Job spec (YAML), local path or URI."),
    address: str | None = typer.Option(
        None, help="Ray cluster (ray://HOST:10001 or HOST:6379); default RAY_ADDRESS or local."
    ),
    run_id: str | None = typer.Option(None, help="Run id (default: derived from the spec)."),
    replan: bool = typer.Option(
        False,
        "--replan",
        help="On resume, list the source again and compute what changed since the run was "
        "planned (default: keep the stored plan and only report changes).",
    ),
) -> None:
    """Run a dataset-wide explanation job on Ray: Parquet out, an MLflow run, a summary table.
    Ctrl-C keeps the finished blocks: the same command resumes."""
    from .engine.job import JobFailed, JobInterrupted, run_job
    from .spec import SpecError, load_spec

    try:
        job = load_spec(spec)
        if _remote_address(address or os.environ.get("RAY_ADDRESS")):
            _refuse_local_only(spec)
        if run_id:
            job = job.model_validate({**job.model_dump(), "run_id": run_id})
    except SpecError as e:
        _fail(str(e))
    except ValueError as e:  # pydantic's, for --run-id
        _fail(f"--run-id {run_id!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}")

    def on_plan(done, total, changes):
        if changes:
            console.print(changes, highlight=False)
        console.print(f"{total} blocks, {done} finished by an earlier attempt", highlight=False)

    def progress(marker, state):
        console.print(
            f"block {state.finished}/{state.total_blocks}: {marker.images_ok}/{marker.n_inputs} "
            f"images explained; {state.line()}",
            highlight=False,
        )

    log_path = _log_path(job.run_id or "run")
    try:
        with ray_output_to(log_path):
            result = run_job(
                job, address=address, progress=progress, on_plan=on_plan, replan=replan
            )
    except SpecError as e:
        _fail(str(e))
    except JobInterrupted as e:
        _fail(f"{e}; run the same command to resume", code=130)
    except (JobFailed, FileNotFoundError, PermissionError, ConnectionError) as e:
        if e.__cause__ is not None:  # a Ray failure: the root cause here, the trace in the log
            with open(log_path, "a") as f:
                f.write("".join(traceback.format_exception(e)))
            _fail(f"job failed: {e} (full trace: {log_path})", code=1)
        _fail(f"job failed: {e}", code=1)
    print_summary(result.summary)
    if result.summary.get("source_changes") and not replan:  # found beside the compute
        console.print(result.summary["source_changes"], highlight=False)
    if result.gate is not None:
        print_changes(result.gate)
    console.print(
        f"run id: {result.run_id}  output: {result.root}  mlflow run: {result.mlflow_run_id}",
        highlight=False,
    )
    console.print(f"report: {result.root}/report.html", highlight=False)
    if result.gate is not None and result.gate["gate"] == "fail":
        errors.print("[red]regression gate failed[/red]: a metric regressed beyond its tolerance")
        raise typer.Exit(3)


def _refuse_local_only(spec: str) -> None:
    """A SpecError for the spec's loopback endpoint or relative sqlite store, read as written
    (`load_spec` makes relative paths absolute here)."""
    from .spec import load_spec

    cluster.check_cluster_bound(load_spec(spec, resolve_paths=False), spec, remote=True)


def _remote_address(address: str | None) -> bool:
    """A Ray address on another machine (not local Ray, not a head on this machine)."""
    from .spec import is_loopback

    return bool(address) and address not in ("auto", "local") and not is_loopback(address)


def _log_path(run_id: str) -> Path:
    """Where Ray's own output goes (~/.cache/salient/logs): kept out of the console, kept for
    a look when something fails."""
    folder = Path(os.environ.get("SALIENT_LOG_DIR", Path.home() / ".cache" / "salient" / "logs"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{run_id}-{time.strftime('%Y%m%d-%H%M%S')}.log"


@contextlib.contextmanager
def ray_output_to(path: Path):
    """Send what Ray writes to the process's stderr (its C++ core worker's lines, the raylet's
    on Ctrl-C, Python warnings) to `path`; Salient's own lines keep the terminal."""
    import logging
    import warnings

    import ray
    import ray.data  # noqa: F401  (its logging set-up runs on import: before ours)

    for name in ("ray", "ray.data", "ray._private.authentication.authentication_token_setup"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")
    log = open(path, "ab")  # noqa: SIM115 - closed below, after fd 2 is restored
    sys.stderr.flush()
    saved = os.dup(2)
    real_stderr = sys.stderr
    ours = not ray.is_initialized()  # a Ray this command starts, it also stops
    # the raylet's messages (e.g. "N PYTHON worker processes have been started") reach the
    # driver through a listener thread that prints them to stdout: to the log with the rest
    import ray._private.worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)

    def raylet_to_log(data, ignore_prefix):
        if data.get("pid") != "raylet":
            return printer(data, ignore_prefix)
        log.write(("\n".join(data.get("lines", [])) + "\n").encode())
        log.flush()

    if printer is not None:
        ray_worker.print_to_stdstream = raylet_to_log
    try:
        os.dup2(log.fileno(), 2)
        if _is_fd(real_stderr, 2):  # a terminal or file: our lines go to the saved fd
            sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
        yield
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()  # inside the redirection: its shutdown lines go to the log too
        if sys.stderr is not real_stderr:
            sys.stderr.close()
            sys.stderr = real_stderr
        if printer is not None:
            ray_worker.print_to_stdstream = printer
        os.dup2(saved, 2)
        os.close(saved)
        log.close()


def _is_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


@app.command(name="bench")
def bench_command(
    model: str = typer.Option("builtin:efficientnet-lite0", help="Model URI."),
    methods: str = typer.Option("gradcam,saliency,scorecam,rise,occlusion", help="Comma list."),
    images: int = typer.Option(16, help="Number of images (real photos, varied crops)."),
    batch: int = typer.Option(8, help="Images per explainer call."),
    size: int | None = typer.Option(None, help="Input side in pixels (default: the model's)."),
    device: str | None = typer.Option(None, help="cpu, cuda ...; default: best available."),
    peers: bool = typer.Option(False, help="Also time Captum / pytorch-grad-cam."),
    rounds: int = typer.Option(3, help="Timed passes over the images; the best counts."),
    param: list[str] = typer.Option([], "--param", "-p", help="METHOD.NAME=VALUE; repeatable."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the rows as JSON here."),
    autocast_cpu: bool = typer.Option(
        False, "--autocast-cpu", help="bf16 autocast for perturbation forwards on CPU."
    ),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile the model for perturbation forwards."
    ),
    pipeline: str | None = typer.Option(
        None, help="A job spec: compare the Ray job's images/s with in-process on its images."
    ),
) -> None:
    """Images/s per method against the forward-throughput bound (and the peers)."""
    import json
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm loads: peers' progress bars
    if pipeline:
        from .bench import bench_pipeline
        from .spec import SpecError, load_spec

        try:
            result = bench_pipeline(load_spec(pipeline))
        except SpecError as e:
            _fail(str(e))
        console.print(
            f"{result['images']} images: in-process {result['in_process_images_per_s']:.2f} "
            f"img/s, Ray job {result['ray_images_per_s']:.2f} img/s (ratio "
            f"{result['ratio']:.2f}), steady state {_fmt(result['ray_steady_images_per_s'])} "
            f"img/s (ratio {_fmt(result['steady_ratio'])}), start-up "
            f"{_fmt(result['startup_seconds'])} s",
            highlight=False,
        )
        if json_path:
            json_path.write_text(json.dumps(result, indent=2))
        return

    from . import bench
    from .models import RunPolicy, load_model

    names = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        params = parse_params(param, names)
        m = load_model(model, device=device, size=size)
        m.set_policy(RunPolicy(autocast_cpu=autocast_cpu, compile=compile_model))
        rows = bench.bench(
            m,
            bench.demo_batch(m, images),
            names,
            batch=batch,
            peers=peers,
            params=params,
            rounds=rounds,
        )
    except ValueError as e:
        _fail(str(e))
    except ModuleNotFoundError as e:  # --peers: the peers come with the `test` extra
        _fail(f"--peers needs the peer libraries: {e}; install salient-pipeline[test]")
    table = Table(title=f"{model} on {rows[0].device if rows else device}, batch {batch}")
    for col in (
        "method",
        "img/s",
        "passes/img",
        "bound img/s",
        "efficiency",
        "peak MB",
        "peer",
        "ours/peer (median)",
        "min-max",
    ):
        table.add_column(col)
    for r in rows:
        spread = r.peer_ratio is not None
        table.add_row(
            r.method,
            f"{r.images_per_s:.2f}",
            f"{r.passes_per_image:.1f}",
            f"{r.bound_images_per_s:.2f}" + (" (F+B)" if r.bound != "forward" else ""),
            f"{r.efficiency:.2f}" + (" [red]![/red]" if r.warning else ""),
            f"{r.peak_memory_mb:.0f}",
            r.peer or "-",
            _fmt(r.peer_ratio),
            f"{r.peer_ratio_min:.2f}-{r.peer_ratio_max:.2f}" if spread else "-",
        )
    console.print(table)
    if any(r.peer for r in rows):
        console.print(f"ours/peer: median of {rows[0].rounds} interleaved rounds", highlight=False)
    for r in rows:
        if r.warning:  # efficiency above the limit: the bound probe, not the method, is wrong
            errors.print(f"[yellow]warning:[/yellow] {escape(r.warning)}", highlight=False)
    if json_path:
        json_path.write_text(json.dumps(bench.as_dicts(rows), indent=2))


@app.command()
def audit(
    model: str = typer.Option(..., help="Model URI (builtin:, torchvision:, timm:, models:/...)."),
    data: str = typer.Option(..., help="Images: a folder or prefix (any fsspec URI)."),
    against: str | None = typer.Option(None, help="A second model: explanation drift."),
    out: str = typer.Option("runs/", help="Output URI."),
    methods: str = typer.Option("gradcam,saliency", help="Comma list of explainers."),
    annotations: str | None = typer.Option(None, help="annotations.json (labels, boxes)."),
    tracking_uri: str = typer.Option(
        "sqlite:///mlflow.db", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."
    ),
    experiment: str = typer.Option("salient-audit"),
    limit: int | None = typer.Option(None, help="Audit only the first N images."),
    steps: int = typer.Option(32, help="Deletion/insertion steps."),
    sanity_images: int = typer.Option(4, help="Images for the randomisation check (0: skip)."),
    size: int | None = typer.Option(None, help="Input side in pixels."),
    endpoint_url: str | None = typer.Option(None, help="S3-compatible endpoint."),
    trust_pickle: bool = typer.Option(False, help="Allow pickled models (runs their code)."),
    address: str | None = typer.Option(None, help="Ray cluster address."),
    random_weights: bool = typer.Option(
        False,
        "--random-weights",
        help="Allow torchvision:/timm: architectures without weights (random init, on purpose).",
    ),
) -> None:
    """Audit a model: accuracy, explanations, faithfulness, localisation, stability, sanity,
    and with --against the drift between two model versions."""
    from .audit import run_audit
    from .engine.job import JobFailed
    from .spec import SpecError
    from .storage import Storage

    try:
        result = run_audit(
            model,
            data,
            against=against,
            out=out,
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            annotations=annotations,
            tracking_uri=tracking_uri,
            experiment=experiment,
            limit=limit,
            steps=steps,
            sanity_images=sanity_images,
            storage=Storage(endpoint_url=endpoint_url),
            trust_pickle=trust_pickle,
            size=size,
            address=address,
            random_init=random_weights,
        )
    except (SpecError, ValueError, PermissionError, FileNotFoundError) as e:
        _fail(str(e))
    except JobFailed as e:
        _fail(f"audit failed: {e}", code=1)
    print_summary(result.run.summary)
    if result.accuracy is not None:
        console.print(f"accuracy (top-1): {result.accuracy:.3f}")
    for method, v in result.sanity.items():
        console.print(f"sanity {method}: {v['verdict']}")
    if result.drift:
        d = result.drift["summary"]
        console.print(
            f"drift against {against}: mean rank correlation "
            f"{_fmt(d['mean_rank_correlation'])}, predictions changed "
            f"{d['predictions_changed']} of {d['pairs']}"
        )
    console.print(f"report: {result.run.root}/report.html  mlflow run: {result.run.mlflow_run_id}")


@app.command()
def compare(
    run: str = typer.Argument(..., help="MLflow run id or salient run id."),
    baseline: str | None = typer.Option(None, help="Run to compare with (default: last success)."),
    tracking_uri: str = typer.Option(
        "sqlite:///mlflow.db", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."
    ),
    tolerance: list[str] = typer.Option(
        [], "--tolerance", "-t", help="METRIC=TOL (abs number or N%); globs allowed; repeatable."
    ),
    match_tag: list[str] = typer.Option(["salient.job"], help="Tags a baseline must share."),
    alpha: float = typer.Option(
        0.05, min=0.0, max=1.0, help="Significance level a change beyond tolerance must reach."
    ),
    endpoint_url: str | None = typer.Option(
        None, envvar="AWS_ENDPOINT_URL", help="S3 endpoint of the runs' output tables."
    ),
) -> None:
    """Compare a run's metrics with a baseline; exit 3 when a metric regressed beyond tolerance
    and significantly (paired on per-image values when both runs scored the same images)."""
    import mlflow

    from .storage import Storage
    from .tracking.compare import (
        compare_metrics,
        directions_from_tags,
        find_baseline,
        gate,
        paired_for,
        parse_tolerance,
        resolve_run,
    )

    tolerances = {}
    for item in tolerance:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--tolerance {item!r}: expected METRIC=TOL (a number or N%)")
        try:
            tolerances[key] = parse_tolerance(value, f"--tolerance {item!r}")
        except ValueError as e:
            _fail(str(e))
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        current = resolve_run(client, run)
        if baseline:
            base = resolve_run(client, baseline)
        else:
            base = find_baseline(client, current.info.experiment_id, current, match_tag)
    except ValueError as e:
        _fail(str(e))
    if base is None:
        _fail(f"no earlier successful run to compare {run} with; pass --baseline")
    directions = {**directions_from_tags(base.data.tags), **directions_from_tags(current.data.tags)}
    if not 0 < alpha < 1:
        _fail(f"--alpha {alpha}: must be between 0 and 1")
    paired, pairing = paired_for(current, base, Storage(endpoint_url=endpoint_url))
    try:
        changes = compare_metrics(
            current.data.metrics,
            base.data.metrics,
            tolerances,
            directions=directions,
            alpha=alpha,
            paired=paired,
        )
    except ValueError as e:
        _fail(str(e))
    verdict = {
        "gate": gate(changes),
        "baseline": base.info.run_id,
        "changes": [c.__dict__ for c in changes],
        "alpha": alpha,
        "pairing": pairing,
    }
    print_changes(verdict)
    if verdict["gate"] == "fail":
        raise typer.Exit(3)


def print_changes(verdict: dict) -> None:
    table = Table(
        title=f"Compared with {verdict['baseline'] or '(no baseline)'}: {verdict['gate'].upper()}",
        caption=DIRECTION_LEGEND,
    )
    for col in ("metric", "better", "baseline", "current", "delta", "tolerance", "p", "status"):
        table.add_column(col)
    style = {"regressed": "red", "missing": "red", "improved": "green", "noise": "yellow"}
    for c in verdict["changes"]:
        if c["status"] == "info" and c["tolerance"] is None:
            continue
        table.add_row(
            c["metric"],
            _arrow(c["higher_is_better"]),
            _fmt(c["baseline"]),
            _fmt(c["current"]),
            _fmt(c["delta"]),
            c["tolerance"] or "-",
            "-" if c.get("p_value") is None else f"{c['p_value']:.3g}",
            f"[{style.get(c['status'], '')}]{c['status']}[/]"
            if style.get(c["status"])
            else c["status"],
        )
    console.print(table)
    if verdict.get("pairing"):
        console.print(
            f"{verdict['pairing']}; a change beyond tolerance fails only at p < "
            f"{verdict.get('alpha', 0.05)} (noise: beyond tolerance, not significant)",
            highlight=False,
        )
    if verdict.get("note"):
        console.print(verdict["note"], highlight=False)


DIRECTION_LEGEND = "↑ higher is better, ↓ lower is better"


def _arrow(higher_is_better: bool | None) -> str:
    return {True: "↑", False: "↓"}.get(higher_is_better, "?")


def print_summary(summary: dict) -> None:
    """Two narrow tables (they fit 80 columns): explainers, then metrics x explainers."""
    explainers = summary["explainers"]
    table = Table(title=f"Run {summary['run_id']}")
    for col in ("explainer", "images", "images/s", "passes/image"):
        table.add_column(col)
    for key, e in explainers.items():
        table.add_row(
            key, str(e["images"]), _fmt(e["images_per_s"]), _fmt(e["forward_passes_per_image"])
        )
    console.print(table)
    directions = {m["key"]: m["higher_is_better"] for m in summary.get("metrics", [])}
    metrics = list(directions) or sorted({m for e in explainers.values() for m in e["metrics"]})
    if metrics:
        mt = Table(
            title="Metric means [95% interval]",
            caption=f"{DIRECTION_LEGEND}; Wilson intervals for 0/1 metrics",
        )
        mt.add_column("metric")
        for key in explainers:
            mt.add_column(key)
        for m in metrics:
            mt.add_row(
                f"{m} {_arrow(directions.get(m))}",
                *[_mean_and_interval(e, m) for e in explainers.values()],
            )
        console.print(mt)
    for warning in summary.get("warnings", []):
        errors.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
    console.print(
        f"inputs {summary['inputs']} = images {summary['images_ok']} + errors "
        f"{summary['errors']} (lost {summary['lost']}); blocks computed "
        f"{summary['blocks_computed']}, resumed {summary['blocks_resumed']}; "
        f"{summary['wall_seconds']:.1f} s wall",
        highlight=False,
    )


def _mean_and_interval(e: dict, metric: str) -> str:
    ci = e.get("metric_intervals", {}).get(metric)
    mean = _fmt(e["metrics"].get(metric))
    return f"{mean} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else mean


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_rows(rows: list[dict], out: Path) -> None:
    predictions = Table(title="Predictions")
    for col in ("image", "predicted", "p", "explained target"):
        predictions.add_column(col)
    seen = {}
    for r in rows:
        seen.setdefault(r["image"], r)
    for r in seen.values():
        predictions.add_row(
            r["image"], r["predicted_name"], f"{r['probability']:.2f}", r["target_name"]
        )
    methods = Table(title="Methods")
    for col in ("method", "forward passes / image", "s / image"):
        methods.add_column(col)
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], r)
    for m, r in by_method.items():
        methods.add_row(m, str(r["forward_passes"]), f"{r['seconds']:.3f}")
    console.print(predictions, methods)
    console.print(f"{len(rows)} overlays (.png) and maps (.npy) written to {out}/")


@app.command()
def view(
    run_uri: str = typer.Argument(..., help="A finished run: <output.uri>/<run_id> (local or S3)."),
    against: str | None = typer.Option(None, help="A second run to compare maps with."),
    port: int = typer.Option(8765, help="Port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; any but loopback needs a token."),
    token: str | None = typer.Option(
        None, envvar="SALIENT_VIEW_TOKEN", help="Token for --host (default: a random one)."
    ),
    endpoint_url: str | None = typer.Option(
        None, envvar="AWS_ENDPOINT_URL", help="S3 endpoint of the runs."
    ),
) -> None:
    """Browse a run: summary with intervals, classes, a filterable grid of overlays, one image
    across explainers, errors, and with --against the images whose maps changed most."""
    from .storage import Storage
    from .view.server import make_server

    try:
        server, url = make_server(
            run_uri.rstrip("/"), Storage(endpoint_url=endpoint_url), against=against,
            host=host, port=port, token=token,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        _fail(str(e))
    console.print(f"serving {run_uri} at {url}  (Ctrl-C stops)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command("spray")
def spray_command(
    run_uri: str = typer.Argument(..., help="The run's folder (its output.uri/<run id>)."),
    explainer: str = typer.Option(..., help="Explainer key of the heatmaps to analyse."),
    size: int = typer.Option(32, help="Side of the pooled maps."),
    k: int = typer.Option(10, "--k", help="Neighbours of the k-NN graph."),
    max_clusters: int = typer.Option(10, help="Clusters looked for by the eigengap, at most."),
    clusters: int | None = typer.Option(None, help="A fixed number of clusters per class."),
    norm: str = typer.Option("l1", help="Per-map normalisation: l1 or max."),
    min_images: int = typer.Option(10, help="Skip classes with fewer heatmaps."),
    all_targets: bool = typer.Option(False, help="Every target of an image, not only the first."),
    boxes: str | None = typer.Option(
        None, help="JSON file: image_id -> [[x0, y0, x1, y1], ...] in model-input pixels."
    ),
    engine: str = typer.Option("auto", help="auto, local (this process) or ray (Ray Data)."),
    address: str | None = typer.Option(None, help="Ray cluster address."),
    tracking_uri: str | None = typer.Option(
        None, envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: the run's)."
    ),
    endpoint_url: str | None = typer.Option(None, help="S3-compatible endpoint."),
) -> None:
    """Spectral relevance analysis: per class, cluster the heatmaps and rank the clusters by
    how far they sit from the class's bulk; writes <run>/spray/<explainer>/."""
    import json

    from .analysis.spray import SprayParams, log_spray, spray, write_spray
    from .storage import Storage

    storage = Storage(endpoint_url=endpoint_url)
    try:
        params = SprayParams(
            size=size,
            norm=norm,
            neighbours=k,
            max_clusters=max_clusters,
            clusters=clusters,
            min_images=min_images,
            all_targets=all_targets,
        )
        box_map = json.loads(storage.read_bytes(boxes)) if boxes else None
        if engine == "ray" or address:
            from .engine.job import init_ray

            init_ray(address)
        result = spray(run_uri.rstrip("/"), explainer, storage, params, box_map, engine)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    uris = write_spray(run_uri.rstrip("/"), result, storage)
    _add_spray_to_report(run_uri.rstrip("/"), result, storage)
    mlflow_run = log_spray(run_uri.rstrip("/"), result, storage, tracking_uri)
    table = Table(title=f"SpRAy: {explainer}, most outlying cluster per class")
    for col in ("class", "heatmaps", "clusters", "top cluster", "share", "score", "examples"):
        table.add_column(col)
    for c in result.clusters.to_pylist():
        if c["cluster_rank"] == 1:
            n = round(c["n_images"] / c["share"])
            table.add_row(
                escape(str(c["target_name"] or c["target"])),
                str(n),
                str(c["clusters"]),
                str(c["cluster"]),
                f"{c['share']:.2f}",
                f"{c['score']:.3f}",
                escape(", ".join(c["examples"][:3])),
            )
    console.print(table)
    for s in result.info["skipped"]:
        console.print(f"skipped class {s['target_name'] or s['target']}: {s['skipped']}")
    console.print(f"written: {uris['spray.parquet']}, {uris['spray_clusters.parquet']}")
    console.print(f"mlflow run: {mlflow_run or '- (the run has none)'}")


def _add_spray_to_report(root: str, result, storage) -> None:
    """The run's report.html gains (or replaces) this explainer's SpRAy section."""
    import json

    from .models.preprocess import Preprocess
    from .report.html import spray_section, with_section

    try:
        report = storage.read_bytes(f"{root}/report.html").decode()
    except FileNotFoundError:
        return  # a run without a report (a partial one): the tables are the result
    try:
        summary = json.loads(storage.read_bytes(f"{root}/summary.json"))
        preprocess = Preprocess(**summary["preprocess"]) if "preprocess" in summary else None
    except FileNotFoundError:
        preprocess = None
    section = spray_section(
        root, result.explainer, result.clusters.to_pylist(), preprocess, storage
    )
    report = with_section(report, f"spray-{result.explainer}", section)
    storage.write_bytes_atomic(f"{root}/report.html", report.encode())


cluster.register(app)  # submit, status, logs: a job on a Ray cluster (pipeline/cluster.py)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="salient")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
