"""A finished run's tables as SQL views, queried in place: what the run browser shows.

DuckDB's own Parquet reader scans the run's files (on S3 and other stores through the run's
fsspec filesystem, registered with DuckDB), so each query reads only the columns and row groups
it needs and nothing is loaded whole: a page of the grid at 1M heatmap rows reads the key
columns, sorts, and returns 48 rows. The heatmaps view is the compacted files (rows of the
blocks the commit names) plus the parts of any block computed since, as `read_table` defines a
run's current rows. Heatmap pixels are read one row at a time, by key, for the overlay drawn.

Classes: an image's class is its label where the source gives one, else its explained target.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..runstore import decode_heatmaps
from ..runstore.tables import TableFiles, table_datasets, table_files
from ..sources.inputs import InputItem
from ..storage import Storage

PAGE = 48
KEY = ("image_id", "explainer", "target")
HEATMAP_COLUMNS = (
    "image_id", "explainer", "method", "target", "target_name", "score", "predicted",
    "predicted_name", "label", "source_uri", "source_member",
)  # fmt: skip


@dataclass(frozen=True)
class GridQuery:
    """The grid's filters, sort and page, as the page's form sends them (empty: no filter)."""

    cls: str = ""  # a class id (label, else target)
    explainer: str = ""
    outcome: str = ""  # "" | correct | wrong (predicted vs label)
    metric: str = ""  # a metric name: shown, filtered by [low, high], sortable
    low: float | None = None
    high: float | None = None
    sort: str = "score"  # score | metric | image_id
    descending: bool = True
    page: int = 0


class RunIndex:
    """One run's summary and SQL views `heatmaps`, `metrics`, `errors` over its tables."""

    def __init__(self, root: str, storage: Storage = Storage()):
        self.root, self.storage = root.rstrip("/"), storage
        try:
            self.summary = json.loads(storage.read_bytes(f"{self.root}/summary.json"))
        except FileNotFoundError:
            raise ValueError(
                f"{root!r} is not a finished run (no summary.json): run the job to its end, "
                "or name the run's folder (<output.uri>/<run_id>)"
            ) from None
        self._db = duckdb.connect()
        self._lock = threading.Lock()
        self._classes: list[dict] | None = None
        fs, _ = storage.filesystem(self.root)
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        if not local:  # DuckDB reads through the run's own fsspec filesystem (no extension)
            self._db.register_filesystem(fs)
        self._uri = (lambda p: p) if local else fs.unstrip_protocol
        self._files = {
            t: table_files(self.root, t, storage) for t in ("heatmaps", "metrics", "errors")
        }
        for table, files in self._files.items():
            self._register(table, files)

    def _register(self, table: str, files: TableFiles) -> None:
        """A view of the table's current rows: DuckDB's own Parquet reader over the files,
        which reads only the columns and row groups a query needs."""
        drop = "block_id, heatmap" if table == "heatmaps" else "block_id"
        selects = []
        if files.compacted:  # the rows of the blocks the commit names
            self._db.register(f"{table}_blocks", pa.table({"block_id": files.blocks}))
            selects.append(
                f"SELECT * EXCLUDE ({drop}) FROM read_parquet({self._list(files.compacted)}, "
                f"hive_partitioning = true) WHERE block_id IN (SELECT block_id FROM {table}_blocks)"
            )
        if files.parts:
            heatmap = " EXCLUDE (heatmap)" if table == "heatmaps" else ""
            selects.append(
                f"SELECT *{heatmap} FROM read_parquet({self._list(files.parts)}, "
                "hive_partitioning = false)"
            )
        if not selects:  # a table the run never wrote (no errors): an empty view of its columns
            empty = {"heatmaps": HEATMAP_COLUMNS, "metrics": (*KEY, "metric", "value"),
                     "errors": ("image_id", "source_uri", "stage", "error_type", "message",
                                "fatal")}[table]  # fmt: skip
            selects.append("SELECT " + ", ".join(f'NULL AS "{c}"' for c in empty) + " LIMIT 0")
        self._db.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(selects))

    def _list(self, paths: list[str]) -> str:
        quoted = ", ".join("'" + self._uri(p).replace("'", "''") + "'" for p in paths)
        return f"[{quoted}]"

    def register_table(self, name: str, table: pa.Table) -> None:
        """A derived table (the two-run changes) queryable beside the run's views."""
        with self._lock:
            self._db.register(name, table)

    def query(self, sql: str, params: list | None = None) -> list[dict]:
        # one connection (the registered datasets are its own), one query at a time; the
        # pages' queries are each well under a second, overlays read pixels without it
        with self._lock:
            rel = self._db.execute(sql, params or [])
            names = [d[0] for d in rel.description]
            return [dict(zip(names, row, strict=True)) for row in rel.fetchall()]

    # -- pages ---------------------------------------------------------------------------------
    def explainers(self) -> list[str]:
        return list(self.summary.get("explainers", {}))

    def metric_names(self) -> list[str]:
        return [m["key"] for m in self.summary.get("metrics", [])]

    def class_names(self) -> dict[int, str]:
        """Class id -> name, from the names the model gave targets and predictions."""
        rows = self.query(
            "SELECT DISTINCT target AS id, target_name AS name FROM heatmaps "
            "UNION SELECT DISTINCT predicted, predicted_name FROM heatmaps"
        )
        return {r["id"]: r["name"] for r in rows if r["id"] is not None}

    def classes(self) -> list[dict]:
        """Per class: images, accuracy (where labels exist) and every explainer's metric means.
        Computed once per browser (a finished run does not change); sorting is the page's."""
        with self._lock:
            cached = self._classes
        if cached is None:
            cached = self._classes_query()
            with self._lock:
                self._classes = cached
        return [dict(r) for r in cached]

    def _classes_query(self) -> list[dict]:
        base = self.query(
            "SELECT coalesce(label, target) AS cls, count(DISTINCT image_id) AS images, "
            "avg(CASE WHEN label IS NULL THEN NULL WHEN predicted = label THEN 1.0 ELSE 0.0 END)"
            " AS accuracy FROM heatmaps GROUP BY cls"
        )
        means = self.query(
            "SELECT coalesce(h.label, h.target) AS cls, m.explainer, m.metric, avg(m.value) AS v "
            "FROM metrics m JOIN heatmaps h USING (image_id, explainer, target) "
            "GROUP BY ALL"
        )
        names = self.class_names()
        out = {r["cls"]: {**r, "name": names.get(r["cls"], str(r["cls"]))} for r in base}
        for r in means:
            if r["cls"] in out:
                out[r["cls"]][f"{r['explainer']}.{r['metric']}"] = r["v"]
        return list(out.values())

    def grid(self, q: GridQuery) -> tuple[int, list[dict]]:
        """(rows matching, this page's rows) of heatmap rows with the chosen metric's value."""
        where, params = [], []
        if q.cls:
            where.append("coalesce(h.label, h.target) = ?")
            params.append(int(q.cls))
        if q.explainer:
            where.append("h.explainer = ?")
            params.append(q.explainer)
        if q.outcome == "correct":
            where.append("h.label IS NOT NULL AND h.predicted = h.label")
        elif q.outcome == "wrong":
            where.append("h.label IS NOT NULL AND h.predicted <> h.label")
        join = ""
        if q.metric:
            join = (
                "LEFT JOIN (SELECT image_id, explainer, target, value FROM metrics "
                "WHERE metric = ?) m USING (image_id, explainer, target)"
            )
            params.insert(0, q.metric)
            if q.low is not None:
                where.append("m.value >= ?")
                params.append(q.low)
            if q.high is not None:
                where.append("m.value <= ?")
                params.append(q.high)
        value = "m.value" if q.metric else "NULL"
        sort = {"metric": value if q.metric else "h.score", "image_id": "h.image_id"}.get(
            q.sort, "h.score"
        )
        order = f"{sort} {'DESC' if q.descending else 'ASC'} NULLS LAST, h.image_id, h.explainer"
        body = f"FROM heatmaps h {join} {'WHERE ' + ' AND '.join(where) if where else ''}"
        cols = ", ".join(f"h.{c}" for c in HEATMAP_COLUMNS)
        page = [PAGE, max(q.page, 0) * PAGE]
        if not join:  # one table: the count is a cheap scan, and the page a top-N sort
            total = self.query(f"SELECT count(*) AS n {body}", params)[0]["n"]
            rows = self.query(
                f"SELECT {cols}, NULL AS value {body} ORDER BY {order} LIMIT ? OFFSET ?",
                [*params, *page],
            )
            return total, rows
        # with the metric joined, the count rides along as a window: one join, not two
        rows = self.query(
            f"SELECT {cols}, {value} AS value, count(*) OVER () AS total_rows {body} "
            f"ORDER BY {order} LIMIT ? OFFSET ?",
            [*params, *page],
        )
        if rows or q.page <= 0:
            return (rows[0]["total_rows"] if rows else 0), rows
        return self.query(f"SELECT count(*) AS n {body}", params)[0]["n"], []  # past the end

    def image(self, image_id: str) -> list[dict]:
        """Every heatmap row of one image, each with its metric values."""
        rows = self.query(
            f"SELECT {', '.join(HEATMAP_COLUMNS)} FROM heatmaps WHERE image_id = ? "
            "ORDER BY explainer, target",
            [image_id],
        )
        values = self.query(
            "SELECT explainer, target, metric, value FROM metrics WHERE image_id = ?", [image_id]
        )
        for r in rows:
            r["metrics"] = {
                v["metric"]: v["value"]
                for v in values
                if (v["explainer"], v["target"]) == (r["explainer"], r["target"])
            }
        return rows

    def errors(self, page: int = 0) -> tuple[int, list[dict]]:
        total = self.query("SELECT count(*) AS n FROM errors")[0]["n"]
        rows = self.query(
            "SELECT * FROM errors ORDER BY image_id LIMIT ? OFFSET ?", [PAGE, max(page, 0) * PAGE]
        )
        return total, rows

    def heatmap(self, image_id: str, explainer: str, target: int) -> tuple[np.ndarray, InputItem]:
        """One decoded map [size, size] and the input it explains, read together by key (row
        groups are skipped by statistics): what an overlay needs, in one read."""
        where = (
            (pc.field("image_id") == image_id)
            & (pc.field("explainer") == explainer)
            & (pc.field("target") == int(target))
        )
        for ds, keep in table_datasets(self._files["heatmaps"]):
            t = ds.to_table(
                columns=["heatmap", "map_min", "map_max", "source_uri", "source_member"],
                filter=where if keep is None else where & keep,
            )
            if t.num_rows:
                row = t.slice(0, 1).select(["source_uri", "source_member"]).to_pylist()[0]
                return decode_heatmaps(t)[0], InputItem(
                    image_id, row["source_uri"], row["source_member"]
                )
        raise FileNotFoundError(f"no heatmap for {image_id} ({explainer}, target {target})")
