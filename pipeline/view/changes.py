"""Which images' maps changed most between two runs (two models, or two nightlies).

Each run's heatmaps are scanned once, a record batch at a time, and each map is reduced to an
8x8 fingerprint (area-averaged, z-scored), so at N heatmap rows the browser holds N x 64 float32
per run plus the keys, never the maps. The fingerprints of rows with the same key (image,
explainer, target) are joined and compared: distance = 1 - Pearson r of the two fingerprints
(0: the same map up to scale and offset; 1: unrelated; 2: inverted; a constant map has r = 0).
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import torch

from ..runstore import decode_heatmaps, shrink
from ..runstore.tables import table_datasets, table_files
from ..storage import Storage

FINGERPRINT = 8


def fingerprints(
    root: str, storage: Storage, batch_rows: int = 65_536
) -> tuple[pa.Table, np.ndarray]:
    """(keys table with a `row` index, [N, 64] z-scored fingerprints) of a run's heatmaps."""
    keys, prints = [], []
    n = 0
    for ds, where in table_datasets(table_files(root, "heatmaps", storage)):
        cols = ["image_id", "explainer", "target", "heatmap", "map_min", "map_max"]
        for batch in ds.to_batches(columns=cols, filter=where, batch_size=batch_rows):
            if batch.num_rows == 0:
                continue
            maps = torch.from_numpy(decode_heatmaps(pa.Table.from_batches([batch])))
            small = shrink(maps, FINGERPRINT).flatten(1)  # the codec's area averaging
            centred = small - small.mean(1, keepdim=True)
            sd = centred.pow(2).mean(1, keepdim=True).sqrt()
            z = torch.where(sd > 1e-12, centred / sd.clamp_min(1e-12), torch.zeros_like(centred))
            prints.append(z.numpy().astype(np.float32))
            keys.append(
                pa.table(
                    {
                        "image_id": batch.column("image_id"),
                        "explainer": batch.column("explainer").cast(pa.string()),
                        "target": batch.column("target"),
                        "row": pa.array(np.arange(n, n + batch.num_rows)),
                    }
                )
            )
            n += batch.num_rows
    if not keys:
        schema = pa.schema(
            [("image_id", pa.string()), ("explainer", pa.string()), ("target", pa.int32()),
             ("row", pa.int64())]
        )  # fmt: skip
        return schema.empty_table(), np.zeros((0, FINGERPRINT * FINGERPRINT), np.float32)
    return pa.concat_tables(keys), np.concatenate(prints)


def map_changes(
    current: str, baseline: str, storage: Storage, other: Storage | None = None
) -> pa.Table:
    """image_id, explainer, target, distance for every heatmap row both runs have."""
    ka, fa = fingerprints(current, storage)
    kb, fb = fingerprints(baseline, other or storage)
    db = duckdb.connect()
    db.register("a", ka)
    db.register("b", kb)
    pairs = db.sql(
        "SELECT a.image_id, a.explainer, a.target, a.row AS ra, b.row AS rb FROM a "
        "JOIN b USING (image_id, explainer, target)"
    ).to_arrow_table()
    ra = pairs.column("ra").to_numpy()
    rb = pairs.column("rb").to_numpy()
    r = (fa[ra] * fb[rb]).mean(1) if len(ra) else np.zeros(0, np.float32)
    return pa.table(
        {
            "image_id": pairs.column("image_id"),
            "explainer": pairs.column("explainer"),
            "target": pairs.column("target"),
            "distance": pa.array((1.0 - r).astype(np.float64)),
        }
    )
