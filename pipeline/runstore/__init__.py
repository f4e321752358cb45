"""The run store: a run's layout on storage, its plan, typed block markers, the heatmap codec
and the reads every other part goes through (job, worker, report, audit, bench, tests)."""

from .codec import (
    ERROR_SCHEMA,
    METRIC_SCHEMA,
    TABLES,
    decode_heatmaps,
    encode_heatmaps,
    heatmap_schema,
    heatmap_table,
    shrink,
)
from .digest import Digest
from .layout import marker_uri, part_uri, run_root, safe_name, spray_uri
from .markers import (
    BlockMarker,
    finished_block_ids,
    finished_blocks,
    read_markers,
    remove_stale_outputs,
    write_block,
)
from .tables import TableFiles, read_heatmap, read_table, table_files

__all__ = [
    "ERROR_SCHEMA",
    "METRIC_SCHEMA",
    "TABLES",
    "BlockMarker",
    "Digest",
    "TableFiles",
    "decode_heatmaps",
    "encode_heatmaps",
    "finished_block_ids",
    "finished_blocks",
    "heatmap_schema",
    "heatmap_table",
    "marker_uri",
    "part_uri",
    "read_heatmap",
    "read_markers",
    "read_table",
    "remove_stale_outputs",
    "run_root",
    "safe_name",
    "shrink",
    "spray_uri",
    "table_files",
    "write_block",
]
