"""Per-image differences between two runs' metric values, for the gate's paired test.

Both runs' metrics tables are read with only the columns the pairing needs (image, explainer,
target, metric, value), joined on (image, explainer, target, metric) and reduced per metric key
to the moments of current - baseline, all inside Arrow: at N scored rows the driver holds two
five-column tables and their join, never Python rows. A metric key is paired only when both
runs scored exactly the same rows for it; otherwise the gate falls back to Welch's test.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ..runstore import read_table
from ..stats import Moments
from ..storage import Storage

JOIN = ["image_id", "explainer", "target", "metric"]


def _values(root: str, storage: Storage, metrics: set[str]) -> pa.Table:
    t = read_table(root, "metrics", storage, columns=[*JOIN, "value"])
    t = t.filter(pc.is_valid(t["value"]))
    if metrics:
        t = t.filter(pc.is_in(t["metric"], pa.array(sorted(metrics))))
    return t


def _counts(t: pa.Table) -> dict[str, int]:
    g = t.group_by(["explainer", "metric"]).aggregate([("value", "count")])
    return {
        f"{e}.{m}": c
        for e, m, c in zip(
            g["explainer"].to_pylist(), g["metric"].to_pylist(), g["value_count"].to_pylist(),
            strict=True,
        )
    }  # fmt: skip


def paired_differences(
    current_root: str, baseline_root: str, keys: list[str], storage: Storage
) -> dict[str, Moments]:
    """metric key (`<explainer>.<metric>`) -> moments of per-image current - baseline, for the
    keys both runs scored on the same rows."""
    wanted = {k.rsplit(".", 1)[-1] for k in keys if "." in k}
    cur = _values(current_root, storage, wanted)
    base = _values(baseline_root, storage, wanted)
    n_cur, n_base = _counts(cur), _counts(base)
    joined = cur.join(base, JOIN, right_suffix="_baseline", join_type="inner")
    joined = joined.append_column("d", pc.subtract(joined["value"], joined["value_baseline"]))
    g = joined.group_by(["explainer", "metric"]).aggregate(
        [("d", "count"), ("d", "mean"), ("d", "variance", pc.VarianceOptions(ddof=0))]
    )
    out: dict[str, Moments] = {}
    for row in g.to_pylist():
        key = f"{row['explainer']}.{row['metric']}"
        n = row["d_count"]
        if key in keys and n == n_cur.get(key) == n_base.get(key):
            out[key] = Moments(n, row["d_mean"], row["d_variance"] * n)
    return out
