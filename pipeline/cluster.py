"""`salient submit / status / logs`: run a job spec on an existing Ray cluster.

The job goes through Ray's Job Submission API (the dashboard, `http://HEAD:8265`), not through
`ray://`: the driver then runs on the cluster and survives the submitter going away (a CronJob
pod, a laptop closing). The runtime environment carries this package (`py_modules`) and the spec
(a one-file `working_dir`), so the cluster runs exactly the code and spec that were validated
here. It carries nothing else: credentials come from the cluster nodes' environment, never from
the runtime env or the entrypoint, and a spec that contains a local secret's value is refused.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

PACKAGE_DIR = Path(__file__).resolve().parent
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SPEC_NAME = "spec.yaml"  # the spec's name inside the job's working_dir

console = Console(highlight=False)
errors = Console(stderr=True, soft_wrap=True, highlight=False)


class SubmitError(RuntimeError):
    """A submission that cannot go ahead; the message says why in one line."""


class DuplicateSubmission(SubmitError):
    """The submission id is already taken on this cluster (the point of `nightly-<date>` ids)."""

    def __init__(self, submission_id: str, status: str | None):
        self.submission_id, self.status = submission_id, status
        state = f" (status {status})" if status else ""
        super().__init__(
            f"submission id {submission_id!r} already exists on this cluster{state}; "
            f"it was not submitted again (see: salient status {submission_id})"
        )


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict
    metadata: dict
    workdir: Path  # temporary folder holding the spec; the caller removes it after submitting


def build_submission(
    spec_uri: str,
    *,
    python: str = "python",
    run_id: str | None = None,
    ship_code: bool = True,
    workdir: Path | None = None,
    remote: bool = True,
) -> Submission:
    """Validate the spec here (a mistake costs nothing on the cluster) and build the entrypoint
    and runtime env. The spec's text travels unchanged, so `{date}` run ids expand on the
    cluster when the job starts. `remote`: the cluster is another machine, so what only works
    here (a loopback storage endpoint, a relative sqlite store) is refused, not warned about."""
    from .spec import SpecError, load_spec
    from .storage import Storage

    # one line per problem; relative paths stay as written (they resolve on the cluster)
    spec = load_spec(spec_uri, resolve_paths=False)
    local_only = check_cluster_bound(spec, spec_uri, remote=remote)
    if run_id:
        try:
            type(spec).model_validate({**spec.model_dump(), "run_id": run_id})
        except ValueError as e:
            raise SpecError(f"--run-id {run_id!r}: {e.errors()[0]['msg']}") from None
    text = Storage().read_bytes(spec_uri)
    _refuse_secrets(text.decode(errors="replace"), "the spec")
    args = [python, "-m", "pipeline.cli", "run", SPEC_NAME]
    if run_id:
        args += ["--run-id", run_id]
    entrypoint = shlex.join(args)
    _refuse_secrets(entrypoint, "the entrypoint")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="salient-submit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / SPEC_NAME).write_bytes(text)
    runtime_env: dict = {"working_dir": str(workdir)}
    if ship_code:
        runtime_env["py_modules"] = [str(PACKAGE_DIR)]
        runtime_env["excludes"] = ["__pycache__", "*.pyc"]
    metadata = {
        "salient.spec": spec_uri,
        "salient.explainers": ",".join(m.key for m in spec.explainers),
    }
    for warning in [*local_only, *relative_path_warnings(spec)]:
        errors.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    return Submission(entrypoint, runtime_env, metadata, workdir)


def check_cluster_bound(spec, where: str, *, remote: bool) -> list[str]:
    """A spec bound for a cluster: its loopback endpoint or relative sqlite store raise a
    SpecError (one line each, naming the field) when the cluster is `remote`; else they are
    returned as warnings (a cluster on this machine reaches this machine's services)."""
    from .spec import SpecError, cluster_problems

    problems = cluster_problems(spec)
    if remote and problems:
        raise SpecError("\n".join(f"{where}: {p}" for p in problems))
    return problems


def relative_path_warnings(spec) -> list[str]:
    """Relative local paths resolve inside the job's temporary working dir on the cluster,
    which Ray deletes: outputs written there are lost. A left-out tracking.uri is read on the
    cluster: its nodes' MLFLOW_TRACKING_URI, else a relative sqlite store there."""
    out = []
    for name, uri in (("source.uri", spec.source.uri), ("output.uri", spec.output.uri)):
        if "://" not in uri and ":" not in uri.split("/")[0] and not uri.startswith("/"):
            out.append(
                f"{name} {uri!r} is a relative local path: on the cluster it resolves inside the "
                "job's temporary working dir; use an absolute path or object storage"
            )
    if "uri" not in spec.tracking.model_fields_set:
        out.append(
            "tracking.uri is not in the spec: the job records to the cluster nodes' "
            "$MLFLOW_TRACKING_URI, or without one to sqlite:///mlflow.db in its temporary "
            "working dir (lost)"
        )
    return out


def _refuse_secrets(text: str, where: str) -> None:
    from .secrets import find_secret

    if key := find_secret(text):
        raise SubmitError(
            f"{where} contains the value of ${key}; credentials come from the cluster "
            "nodes' environment, never from the submission"
        )


def client(address: str | None):
    """A JobSubmissionClient, or a one-line SubmitError when the dashboard cannot be reached."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:  # pragma: no cover - ray[default] is a dependency
        raise SubmitError(f"job submission needs ray[default]: {e}") from None
    for name in (
        "ray.dashboard.modules.dashboard_sdk",
        "ray.dashboard.modules.job.sdk",
        "ray._private.runtime_env.packaging",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)  # per-upload INFO lines
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(
            f"cannot reach the Ray dashboard at {address}: {_first_line(e)}"
        ) from None


def submit(
    address: str | None,
    sub: Submission,
    submission_id: str | None = None,
) -> str:
    """Submit; a taken submission id raises DuplicateSubmission (Ray refuses to reuse it)."""
    jobs = client(address)
    try:
        return jobs.submit_job(
            entrypoint=sub.entrypoint,
            runtime_env=sub.runtime_env,
            metadata=sub.metadata,
            submission_id=submission_id,
        )
    except RuntimeError as e:
        if submission_id and "already exists" in str(e):
            raise DuplicateSubmission(submission_id, _status_or_none(jobs, submission_id)) from None
        raise SubmitError(f"submission refused: {_first_line(e)}") from None


def job_info(address: str | None, job_id: str):
    jobs = client(address)
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as e:
        raise SubmitError(f"no job {job_id!r} on this cluster ({_first_line(e)})") from None


def job_logs(address: str | None, job_id: str) -> str:
    jobs = client(address)
    try:
        return jobs.get_job_logs(job_id)
    except RuntimeError as e:
        raise SubmitError(f"no logs for job {job_id!r}: {_first_line(e)}") from None


def follow_logs(address: str | None, job_id: str, write=None) -> None:
    """Stream a job's logs until it ends (a websocket on the dashboard)."""
    write = write or _write
    jobs = client(address)
    job_info(address, job_id)  # a clear message for an unknown id, before the websocket

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the socket closed early: the caller falls back to polling
        errors.print(f"[yellow]log stream ended early:[/yellow] {escape(_first_line(e))}")


def wait(address: str | None, job_id: str, *, poll_s: float = 2.0, timeout_s: float | None = None):
    """Block until the job is in a terminal state; returns its JobInfo."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = job_info(address, job_id)
        if _status(info) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {_status(info)} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def exit_code(info) -> int:
    """0 when the job succeeded; else the driver's exit code (1 failed, 2 bad spec, 3 the
    regression gate), or 1 when Ray has none (stopped, or the driver never started)."""
    if _status(info) == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def _status(info) -> str:
    status = info.status
    return getattr(status, "value", str(status))


def _status_or_none(jobs, job_id: str) -> str | None:
    try:
        return _status(jobs.get_job_info(job_id))
    except Exception:  # only for the message
        return None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:  # Ray wraps the server's reason in an HTTP error; keep the reason
        if "already exists" in ln or "does not exist" in ln:
            return ln
    return lines[0] if lines else type(e).__name__


def _write(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _fail(message: str, code: int) -> None:
    errors.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


# -- the commands ---------------------------------------------------------------------------
ADDRESS_HELP = "Ray dashboard, http://HEAD:8265 (or RAY_API_SERVER_ADDRESS)."


def register(app: typer.Typer) -> None:
    """Add `submit`, `status` and `logs` to the `salient` app."""

    @app.command(name="submit")
    def submit_command(
        spec: str = typer.Argument(..., help="Job spec (YAML), local path or URI."),
        address: str = typer.Option(..., envvar="RAY_API_SERVER_ADDRESS", help=ADDRESS_HELP),
        submission_id: str | None = typer.Option(
            None, help="Job id; reusing one is refused (nightly-<date> runs once a day)."
        ),
        python: str = typer.Option(
            "python", help="Interpreter the entrypoint runs on the cluster (absolute path or name)."
        ),
        run_id: str | None = typer.Option(None, help="Run id (default: derived from the spec)."),
        ship_code: bool = typer.Option(
            True, help="Upload this package with the job (off: use the cluster's install)."
        ),
        wait_: bool = typer.Option(
            False, "--wait", help="Follow the logs until the job ends; exit non-zero if it failed."
        ),
    ) -> None:
        """Submit a job spec to a Ray cluster (Ray Job Submission); prints the job id."""
        import shutil

        from .spec import SpecError, is_loopback

        try:
            # a dashboard on this machine (the local stack) reaches this machine's services;
            # a port-forward to a remote cluster does not: then the lines printed as warnings
            # are the job's errors
            sub = build_submission(
                spec,
                python=python,
                run_id=run_id,
                ship_code=ship_code,
                remote=not is_loopback(address),
            )
        except (SpecError, SubmitError, FileNotFoundError, PermissionError) as e:
            _fail(str(e), 2)
        try:
            job_id = submit(address, sub, submission_id)
        except DuplicateSubmission as e:
            _fail(str(e), 2)
        except SubmitError as e:
            _fail(str(e), 1)
        finally:
            shutil.rmtree(sub.workdir, ignore_errors=True)
        console.print(job_id)
        if wait_:
            _wait_and_exit(address, job_id)

    @app.command(name="status")
    def status_command(
        job_id: str = typer.Argument(..., help="Job (submission) id."),
        address: str = typer.Option(..., envvar="RAY_API_SERVER_ADDRESS", help=ADDRESS_HELP),
        wait_: bool = typer.Option(
            False, "--wait", help="Block until the job ends; exit non-zero if it failed."
        ),
    ) -> None:
        """A submitted job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
        try:
            info = wait(address, job_id) if wait_ else job_info(address, job_id)
        except SubmitError as e:
            _fail(str(e), 2 if "no job" in str(e) else 1)
        _print_status(job_id, info)
        if wait_:
            raise typer.Exit(exit_code(info))

    @app.command(name="logs")
    def logs_command(
        job_id: str = typer.Argument(..., help="Job (submission) id."),
        address: str = typer.Option(..., envvar="RAY_API_SERVER_ADDRESS", help=ADDRESS_HELP),
        follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends."),
    ) -> None:
        """A submitted job's driver logs (the same output `salient run` prints)."""
        try:
            if follow:
                follow_logs(address, job_id)
            else:
                _write(job_logs(address, job_id))
        except SubmitError as e:
            _fail(str(e), 2 if "no job" in str(e) or "no logs" in str(e) else 1)


def _wait_and_exit(address: str, job_id: str) -> None:
    try:
        follow_logs(address, job_id)
        info = wait(address, job_id)
    except SubmitError as e:
        _fail(str(e), 1)
    _print_status(job_id, info)
    raise typer.Exit(exit_code(info))


def _print_status(job_id: str, info) -> None:
    status = _status(info)
    style = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow"}.get(status, "cyan")
    line = f"{escape(job_id)}: [{style}]{status}[/{style}]"
    if info.message:
        line += f"  {escape(info.message)}"
    code = getattr(info, "driver_exit_code", None)
    if status in TERMINAL and code is not None:
        line += f"  (driver exit code {code})"
    console.print(line)
