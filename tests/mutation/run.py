"""Mutation testing of the core modules with cosmic-ray: `make mutation` (not part of CI).

Each module in SCOPE is mutated by cosmic-ray (one small change at a time: an operator, a
constant, a comparison, a removed `not`) and the tests that cover it run against each mutant; a
mutant the tests fail on is killed, one they pass on survived. To fit about 30 minutes on 2
cores, `--per-module N` samples N mutants per module (seeded, spread over cosmic-ray's
operators); `--per-module 0` runs them all.

The real tree is never mutated: each parallel worker gets its own copy of the working tree
(tracked and untracked-but-not-ignored files) under a temporary folder, and imports the
package from there. Prints a table per module, `mutation score: N%` overall and per group
(explainers, metrics, engine), and every surviving mutant with its diff. Known equivalent
mutants (a change no test can see, listed in EQUIVALENT with the reason) are reported apart
and left out of the score.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = ["-m", "not slow and not realdata"]

# module -> (group, the test files that check it). Only fast, in-process tests: a mutant costs
# one pytest start (~5 s with torch) plus these tests.
KNOWN = "tests/test_known_answers.py"
RULES = "tests/test_rules.py"
SCOPE: dict[str, tuple[str, list[str]]] = {
    "pipeline/explainers/cam.py": ("explainers", ["tests/test_explainers.py", KNOWN]),
    "pipeline/explainers/gradients.py": ("explainers", ["tests/test_explainers.py", KNOWN, RULES]),
    "pipeline/explainers/glas.py": ("explainers", ["tests/test_blackbox.py"]),
    "pipeline/explainers/perturbation.py": ("explainers", ["tests/test_blackbox.py", KNOWN]),
    # the out-of-memory halving is tested with the gradient family's suite
    "pipeline/compute/perturbed_forward.py": (
        "explainers",
        ["tests/test_blackbox.py", "tests/test_explainers.py"],
    ),
    "pipeline/explainers/evet.py": ("explainers", ["tests/test_blackbox.py", KNOWN]),
    "pipeline/compute/transforms.py": ("explainers", ["tests/test_blackbox.py", KNOWN]),
    "pipeline/explainers/lrp.py": ("explainers", ["tests/test_lrp.py", KNOWN, RULES]),
    "pipeline/explainers/deeplift.py": ("explainers", ["tests/test_lrp.py", RULES]),
    "pipeline/explainers/hooks.py": (
        "explainers",
        [RULES, "tests/test_lrp.py", "tests/test_explainers.py"],
    ),
    "pipeline/explainers/attribution_vis.py": ("explainers", ["tests/test_attribution_vis.py"]),
    "pipeline/metrics/faithfulness.py": ("metrics", ["tests/test_metrics.py", KNOWN]),
    "pipeline/metrics/localisation.py": ("metrics", ["tests/test_metrics.py", KNOWN]),
    "pipeline/metrics/stability.py": ("metrics", ["tests/test_metrics.py", KNOWN]),
    "pipeline/metrics/sanity.py": ("metrics", ["tests/test_metrics.py"]),
    "pipeline/metrics/base.py": ("metrics", ["tests/test_metrics.py", KNOWN]),
    "pipeline/engine/outputs.py": ("engine", ["tests/test_blocks.py"]),
    "pipeline/engine/worker.py": ("engine", ["tests/test_blocks.py"]),
    "pipeline/engine/job.py": ("engine", ["tests/test_blocks.py"]),
    "pipeline/sources/listing.py": ("engine", ["tests/test_blocks.py", "tests/test_sources.py"]),
}

# (module, line, operator) -> why the fast tests cannot tell the mutant from the original: a
# change no caller can see, or a path only a real Ray job reaches (the slow job tests cover it;
# starting Ray per mutant would not fit the budget). Lines are the tree's as of this listing.
JOB = "pipeline/engine/job.py"
RAY_ONLY = "Ray path: reached only by the slow job tests (tests/test_job.py), not the fast ones"
STATIC = "torch calls an autograd Function's forward/backward on the class: @staticmethod or not"
EQUIVALENT: dict[tuple[str, int, str], str] = {
    **{
        (module, line, "core/RemoveDecorator"): STATIC
        for module, lines in {
            "pipeline/explainers/hooks.py": (213, 222),
        }.items()
        for line in lines
    },
    ("pipeline/explainers/perturbation.py", 228, "core/NumberReplacer"): (
        "SLIC's start_label: the labels are only used as segment ids"
    ),
    (JOB, 201, "core/AddNot"): RAY_ONLY + " (the progress callback of run_job)",
    (JOB, 298, "core/NumberReplacer"): RAY_ONLY + " (the decode tasks' CPU share)",
    (JOB, 313, "core/ExceptionReplacer"): RAY_ONLY + " (a Ray failure's root cause)",
    (JOB, 477, "core/ReplaceBinaryOperator_Add_BitAnd"): RAY_ONLY + " (overlays sent to MLflow)",
    (JOB, 477, "core/ReplaceBinaryOperator_Add_BitXor"): RAY_ONLY + " (overlays sent to MLflow)",
}

TARGETS = {"explainers": 85.0, "metrics": 85.0, "engine": 80.0}


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored) into `dest`."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_command(tests: list[str]) -> str:
    # -x: the first failing test kills the mutant; the copy's `pipeline` comes first on the path
    args = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *FAST, *tests]
    return shlex.join(args)


def run_module(module: str, workdir: Path, per_module: int, seed: int, log) -> dict:
    group, tests = SCOPE[module]
    name = module.replace("/", "_").removesuffix(".py")
    config, session = workdir / f"{name}.toml", workdir / f"{name}.sqlite"
    t0 = time.perf_counter()
    baseline = subprocess.run(test_command(tests), shell=True, cwd=workdir, capture_output=True)
    seconds = time.perf_counter() - t0
    if baseline.returncode != 0:
        tail = baseline.stdout.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{module}: its tests fail unmutated:\n{tail}")
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {max(30.0, 3 * seconds + 10):.0f}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(test_command(tests))}\n"
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    subprocess.run(["cosmic-ray", "init", str(config), str(session)], cwd=workdir, check=True)
    total = sample(session, per_module, seed)
    log(f"{module}: {per_module or total} of {total} mutants, tests {seconds:.0f} s unmutated")
    subprocess.run(
        ["cosmic-ray", "exec", str(config), str(session)],
        cwd=workdir,
        check=True,
        capture_output=True,
    )
    return {"module": module, "group": group, "total": total, **results(session, module)}


def sample(session: Path, n: int, seed: int) -> int:
    """Keep n mutants, spread over the operators (round robin over shuffled per-operator lists);
    the others are marked skipped so `exec` leaves them. Returns how many there were."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        everything = list(db.work_items)
        # annotations are never evaluated (`from __future__ import annotations`): a mutant
        # inside one (`float | None` -> `float + None`) is equivalent by construction
        annotation = [item for item in everything if _in_annotation(item)]
        db.set_multiple_results(
            [item.job_id for item in annotation],
            WorkResult(worker_outcome=WorkerOutcome.SKIPPED),
        )
        items = [item for item in everything if item not in annotation]
        if n <= 0 or n >= len(items):
            return len(items)
        rng = random.Random(seed)
        by_operator: dict[str, list] = defaultdict(list)
        for item in items:
            by_operator[item.mutations[0].operator_name].append(item)
        for group in by_operator.values():
            rng.shuffle(group)
        chosen: list = []
        pools = sorted(by_operator.values(), key=lambda g: g[0].mutations[0].operator_name)
        while len(chosen) < n:
            for pool in pools:
                if pool and len(chosen) < n:
                    chosen.append(pool.pop())
        keep = {item.job_id for item in chosen}
        skip = [item.job_id for item in items if item.job_id not in keep]
        db.set_multiple_results(skip, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
        return len(items)


def _in_annotation(item) -> bool:
    """A `|` replaced on a `def` line or a bare annotated name: only annotations use `|` there."""
    mutation = item.mutations[0]
    if "ReplaceBinaryOperator_BitOr_" not in mutation.operator_name:
        return False
    lines = Path(mutation.module_path).read_text().splitlines()
    line = lines[mutation.start_pos[0] - 1].strip()
    return line.startswith(("def ", "async def ", ") ->")) or "->" in line


def results(session: Path, module: str) -> dict:
    con = sqlite3.connect(session)
    rows = con.execute(
        "SELECT r.test_outcome, r.worker_outcome, r.diff, m.operator_name, m.start_pos_row "
        "FROM work_results r JOIN mutation_specs m ON r.job_id = m.job_id"
    ).fetchall()
    out = {"killed": 0, "survived": [], "equivalent": [], "incompetent": 0}
    for test_outcome, worker_outcome, diff, operator, line in rows:
        test_outcome, worker_outcome = str(test_outcome).lower(), str(worker_outcome).lower()
        if worker_outcome == "skipped":
            continue
        if test_outcome == "killed":
            out["killed"] += 1
        elif test_outcome == "survived":
            why = EQUIVALENT.get((module, line, operator))
            entry = {"line": line, "operator": operator, "diff": diff, "why": why}
            out["equivalent" if why else "survived"].append(entry)
        else:
            out["incompetent"] += 1
    return out


def score(killed: int, survived: int) -> float:
    return 100.0 * killed / (killed + survived) if killed + survived else 100.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-module", type=int, default=8, help="mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="modules mutated in parallel")
    ap.add_argument("--module", action="append", help="only these modules (paths)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    modules = args.module or list(SCOPE)
    unknown = [m for m in modules if m not in SCOPE]
    if unknown:
        ap.error(f"not in scope: {', '.join(unknown)} (scope: {', '.join(SCOPE)})")
    if not shutil.which("cosmic-ray"):
        ap.error("cosmic-ray is not installed: pip install -c constraints.txt '.[mutation]'")

    def log(msg: str) -> None:
        print(msg, flush=True)

    with tempfile.TemporaryDirectory(prefix="salient-mutation-") as tmp:
        copies = []
        for i in range(max(1, args.jobs)):
            copies.append(Path(tmp) / f"tree{i}")
            copy_tree(copies[-1])
        free = list(copies)
        found = []
        with concurrent.futures.ThreadPoolExecutor(len(copies)) as pool:
            pending = {}
            queue = list(modules)
            while queue or pending:
                while queue and free:
                    tree = free.pop()
                    module = queue.pop(0)
                    job = pool.submit(run_module, module, tree, args.per_module, args.seed, log)
                    pending[job] = tree
                done, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for job in done:
                    free.append(pending.pop(job))
                    found.append(job.result())
    return report(found, args.json)


def report(found: list[dict], json_path: Path | None) -> int:
    found.sort(key=lambda r: list(SCOPE).index(r["module"]))
    print(f"\n{'module':42} {'mutants':>8} {'killed':>7} {'survived':>9} {'equiv':>6} {'score':>7}")
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in found:
        survived = len(r["survived"])
        groups[r["group"]][0] += r["killed"]
        groups[r["group"]][1] += survived
        print(
            f"{r['module']:42} {r['total']:>8} {r['killed']:>7} {survived:>9} "
            f"{len(r['equivalent']):>6} {score(r['killed'], survived):>6.1f}%"
        )
    ok = True
    for group, (killed, survived) in groups.items():
        s = score(killed, survived)
        ok &= s >= TARGETS[group]
        print(f"{group}: mutation score {s:.1f}% (target {TARGETS[group]:.0f}%)")
    killed = sum(k for k, _ in groups.values())
    survived = sum(s for _, s in groups.values())
    print(f"mutation score: {score(killed, survived):.1f}%")
    for r in found:
        for m in r["survived"]:
            print(f"\nSURVIVED {r['module']}:{m['line']} {m['operator']}\n{m['diff']}")
    if json_path:
        json_path.write_text(json.dumps(found, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
