"""Where everything of a run lives. One run is one folder (local or an object-store prefix):

<output.uri>/<run_id>/
  _plan/plan.parquet              the inputs and their blocks, written before any compute
  _plan/blocks.parquet            the same, one row per block: what Ray Data reads
  heatmaps/part-<block>.parquet   one row per image x target x explainer
  metrics/part-<block>.parquet    one row per image x target x explainer x metric
  errors/part-<block>.parquet     one row per input (or failed step) that went wrong; only
                                  written when there is one
  _blocks/<block>.json            written last: the block is finished (typed BlockMarker)
  overlays/<explainer>/*.png      a few overlays from the first block
  pictures/<explainer>/*.png      per-pair image extras (Explainer.image_extras)
  spray/<explainer>/spray.parquet           SpRAy: one row per heatmap analysed (pipeline/analysis)
  spray/<explainer>/spray_clusters.parquet  SpRAy: one row per class x cluster
  spray/<explainer>/spray.json              SpRAy: parameters, eigenvalues per class, costs
  summary.json, digest.json, report.html, spec.yaml
"""

from __future__ import annotations

import posixpath
import re


def run_root(output_uri: str, run_id: str) -> str:
    return posixpath.join(output_uri.rstrip("/"), run_id)


def part_uri(root: str, table: str, block_id: str) -> str:
    return f"{root}/{table}/part-{block_id}.parquet"


def marker_uri(root: str, block_id: str) -> str:
    return f"{root}/_blocks/{block_id}.json"


def plan_uri(root: str) -> str:
    return f"{root}/_plan/plan.parquet"


def plan_blocks_uri(root: str) -> str:
    return f"{root}/_plan/blocks.parquet"


def spray_uri(root: str, explainer: str, name: str) -> str:
    """`name`: "spray.parquet", "spray_clusters.parquet" or "spray.json"."""
    return f"{root}/spray/{safe_name(explainer)}/{name}"


def safe_name(name: str) -> str:
    """A file name from an image id: no separators, no '..', nothing but [A-Za-z0-9._-]."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__")).lstrip(".")
    return cleaned[:200] or "image"


# overlays/<explainer>/<id>.t<target>.png and pictures/<explainer>/<id>.t<target>.<name>.png
PAIR_FILE = re.compile(r"^(.*)\.t\d+\.(?:[A-Za-z0-9_-]+\.)?png$")
