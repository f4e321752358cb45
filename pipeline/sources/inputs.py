"""A run's inputs as Arrow columns, and their cut into blocks.

At ten million images the driver cannot hold a Python object per input (an InputItem with its
strings is ~400 B, ~4 GB in all): listing, planning, and writing and reading the plan work on
one Arrow table (`Inputs`, ~100 B per input), and only the few hundred inputs of one block
become InputItems, where that block is read or looked at.

A block is the unit of work, of output files and of resume. Its id is a digest of its inputs'
ids and versions (size + ETag or mtime), never of its position: the same inputs give the same
blocks, and a block whose inputs changed gets a new id, so a re-run can tell what it finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# the `member` of an item that stands for every sample of a container (a WebDataset shard):
# the block that reads it lists its samples
ALL_SAMPLES = "*"
# a row group bigger than a block stays whole in one block up to this many blocks' worth
MAX_ROW_GROUP_BLOCKS = 4
# rows turned into Python objects at a time (iteration) or hashed at a time (block ids)
ROWS_PER_BATCH = 65_536
ROWS_PER_DIGEST_PASS = 262_144

INPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("member", pa.string()),  # tar member / Parquet row in uri, or null
        ("label", pa.string()),  # JSON: an index, a class name or null
        ("version", pa.string()),  # size + ETag/mtime (+ annotation digest) when listed
        ("meta", pa.string()),  # JSON: folder, annotation, shard, ...
    ]
)


@dataclass(frozen=True)
class InputItem:
    """One input image. `uri` is where its bytes are; `member` names it inside a container
    (a tar member, a Parquet row index, or ALL_SAMPLES: a whole shard); `image_id` is unique
    within the job. Items read from a container carry meta["shard"] (its uri) and, for Parquet,
    meta["row_group"]."""

    image_id: str
    uri: str
    member: str | None = None
    label: int | str | None = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    # what the bytes were when listed (size + ETag/mtime): a changed input is a new input
    version: str = ""


@dataclass(frozen=True)
class Block:
    block_id: str
    items: tuple[InputItem, ...]


def json_text(value) -> str:
    # most inputs have no label or meta: skip the encoder for those (millions of rows)
    if value is None:
        return "null"
    if value == {}:
        return "{}"
    if type(value) is int:  # a class index, as json.dumps writes it
        return str(value)
    return json.dumps(value, sort_keys=True)


def from_json_text(text: str | None):
    # most rows hold no label or meta: skip the parser for those
    if text is None or text == "null":
        return None
    if text == "{}":
        return {}
    return json.loads(text)


def item_from_row(r: dict) -> InputItem:
    return InputItem(
        r["image_id"],
        r["uri"],
        r["member"],
        from_json_text(r["label"]),
        from_json_text(r["meta"]) or {},
        r["version"] or "",
    )


class Inputs:
    """Inputs as one Arrow table (INPUT_SCHEMA). Iterating gives InputItems a batch at a time;
    a slice is an Inputs over the same buffers."""

    __slots__ = ("table",)

    def __init__(self, table: pa.Table):
        self.table = table

    @classmethod
    def of(cls, items: Inputs | Iterable[InputItem]) -> Inputs:
        return items if isinstance(items, Inputs) else cls.from_items(items)

    @classmethod
    def from_items(cls, items: Iterable[InputItem]) -> Inputs:
        columns: dict[str, list] = {name: [] for name in INPUT_SCHEMA.names}
        for it in items:
            columns["image_id"].append(it.image_id)
            columns["uri"].append(it.uri)
            columns["member"].append(it.member)
            columns["label"].append(None if it.label is None else json_text(it.label))
            columns["version"].append(it.version)
            columns["meta"].append(json_text(it.meta))
        return cls(pa.table(columns, schema=INPUT_SCHEMA))

    def __len__(self) -> int:
        return self.table.num_rows

    def __iter__(self) -> Iterator[InputItem]:
        for batch in self.table.to_batches(ROWS_PER_BATCH):
            for r in batch.to_pylist():
                yield item_from_row(r)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("Inputs: a slice with a step")
            return Inputs(self.table.slice(start, max(0, stop - start)))
        n = len(self)
        if not -n <= index < n:
            raise IndexError(index)
        return item_from_row(self.table.slice(index % n, 1).to_pylist()[0])

    @property
    def image_ids(self) -> pa.ChunkedArray:
        return self.table.column("image_id")

    def sorted(self) -> Inputs:
        """By image id; the same table when it already is (no copy of 10M rows)."""
        if _ascending(self.image_ids):
            return self
        return Inputs(self.table.take(pc.sort_indices(self.image_ids)))

    def first_duplicate(self) -> str | None:
        """An image id that two inputs share, if any."""
        ids = self.image_ids
        if not _ascending(ids):
            ids = pc.take(ids, pc.sort_indices(ids))
        if len(ids) < 2:
            return None
        at = pc.index(pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)), True).as_py()
        return None if at < 0 else ids[at].as_py()


def _ascending(values) -> bool:
    """Whether `values` never decrease (one comparison of neighbours: a bit per row)."""
    if len(values) < 2:
        return True
    after, before = values.slice(1), values.slice(0, len(values) - 1)
    return not pc.any(pc.less(after, before)).as_py()


class Blocks:
    """Inputs cut into blocks: the inputs' rows grouped by block (`inputs`, INPUT_SCHEMA),
    each block's id, and where its rows start (`offsets`, one more than there are blocks).
    Indexing or iterating gives Blocks of InputItems, one block at a time."""

    __slots__ = ("inputs", "ids", "offsets")

    def __init__(self, inputs: pa.Table, ids: list[str], offsets: np.ndarray):
        self.inputs, self.ids = inputs, ids
        self.offsets = np.asarray(offsets, dtype=np.int64)

    @classmethod
    def empty(cls) -> Blocks:
        return cls(INPUT_SCHEMA.empty_table(), [], np.zeros(1, np.int64))

    @classmethod
    def of(cls, blocks: Blocks | Iterable[Block]) -> Blocks:
        if isinstance(blocks, Blocks):
            return blocks
        blocks = list(blocks)
        items = Inputs.from_items(it for b in blocks for it in b.items)
        sizes = [len(b.items) for b in blocks]
        return cls(items.table, [b.block_id for b in blocks], np.cumsum([0, *sizes]))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return self._take_blocks(np.arange(len(self))[i])
            stop = max(start, stop)  # consecutive blocks: a view of their rows, no copy
            rows = self.offsets[start : stop + 1]
            part = self.inputs.slice(rows[0], rows[-1] - rows[0])
            return Blocks(part, self.ids[start:stop], rows - rows[0])
        i = range(len(self))[i]
        rows = self.inputs.slice(self.offsets[i], self.offsets[i + 1] - self.offsets[i])
        return Block(self.ids[i], tuple(Inputs(rows)))

    def __iter__(self) -> Iterator[Block]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other) -> bool:
        """Equal to any sequence of the same Blocks (ids and inputs), in the same order."""
        if isinstance(other, Blocks | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None

    @property
    def n_inputs(self) -> int:
        return int(self.offsets[-1])

    def block_of_each_input(self) -> pa.Array:
        """The block id of every row of `inputs` (the plan's block_id column)."""
        ids = pa.array(self.ids, pa.string())
        return ids.take(pa.array(np.repeat(np.arange(len(self)), np.diff(self.offsets))))

    def first_image_ids(self) -> pa.Array:
        return self.inputs.column("image_id").take(pa.array(self.offsets[:-1]))

    def select(self, keep: set[str]) -> Blocks:
        """The blocks whose ids are in `keep`, in this order."""
        chosen = [i for i, bid in enumerate(self.ids) if bid in keep]
        if len(chosen) == len(self):
            return self
        return self._take_blocks(np.array(chosen, np.int64))

    def sorted_by_first_image(self) -> Blocks:
        order = pc.sort_indices(self.first_image_ids()).to_numpy().astype(np.int64)
        if np.all(np.diff(order) > 0):  # already in order (a fresh plan): no copy
            return self
        return self._take_blocks(order)

    def _take_blocks(self, order: np.ndarray) -> Blocks:
        if len(order) == 0:
            return Blocks.empty()
        starts, sizes = self.offsets[:-1][order], np.diff(self.offsets)[order]
        # the rows of each chosen block, in order: starts repeated plus 0..size-1
        rows = np.repeat(starts - np.cumsum(np.r_[0, sizes[:-1]]), sizes) + np.arange(sizes.sum())
        return Blocks(
            self.inputs.take(pa.array(rows, pa.int64())),
            [self.ids[i] for i in order],
            np.r_[0, np.cumsum(sizes)],
        )

    @staticmethod
    def concat(parts: list[Blocks]) -> Blocks:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Blocks.empty()
        if len(parts) == 1:
            return parts[0]
        tables = [p.inputs.select(INPUT_SCHEMA.names).cast(INPUT_SCHEMA) for p in parts]
        offsets, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += p.n_inputs
        ids = [bid for p in parts for bid in p.ids]
        return Blocks(pa.concat_tables(tables), ids, np.concatenate(offsets))


def make_blocks(items: Inputs | Iterable[InputItem], block_size: int) -> Blocks:
    """Blocks named by the digest of their inputs. Plain files: consecutive runs of
    `block_size` items, in the order given. Items of containers (a member) are cut so that each
    container part is read by one block: a WebDataset shard is a block of its own; Parquet rows
    are grouped by row group, a block holding whole row groups up to `block_size` rows, a bigger
    row group alone up to MAX_ROW_GROUP_BLOCKS x block_size rows and, beyond that, cut into the
    fewest equal slices of at most that, each of which reads the whole row group's image
    column."""
    table = Inputs.of(items).table
    n = table.num_rows
    if n == 0:
        return Blocks.empty()
    if pc.all(pc.is_null(table.column("member"))).as_py():  # no containers: runs, in order
        offsets = np.r_[np.arange(0, n, block_size), n].astype(np.int64)
        return Blocks(table, block_ids(table, offsets), offsets)
    in_container = pc.is_valid(table.column("member")).to_numpy(zero_copy_only=False)
    plain = np.flatnonzero(~in_container)
    sizes = [min(block_size, len(plain) - s) for s in range(0, len(plain), block_size)]
    order = [plain]
    if in_container.any():
        container = np.flatnonzero(in_container)
        # containers are few (shards) or already one row per image (Parquet): Python is fine
        parts = table.take(pa.array(container))
        chunks = _container_chunks(list(Inputs(parts)), block_size)
        order += [container[chunk] for chunk in chunks]
        sizes += [len(chunk) for chunk in chunks]
    rows = np.concatenate(order)
    if not np.array_equal(rows, np.arange(n)):
        table = table.take(pa.array(rows, pa.int64()))
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    return Blocks(table, block_ids(table, offsets), offsets)


def block_ids(table: pa.Table, offsets: np.ndarray) -> list[str]:
    """The id of each block of `table`'s rows (cut at `offsets`): sha256 of its lines
    "image_id\\tversion" joined by newlines, hashed from the Arrow buffers a pass of about
    ROWS_PER_DIGEST_PASS rows at a time (no Python string per input)."""
    ids: list[str] = []
    first, n_blocks = 0, len(offsets) - 1
    while first < n_blocks:
        # the blocks of this pass: at least one, up to ROWS_PER_DIGEST_PASS rows
        last = int(np.searchsorted(offsets, offsets[first] + ROWS_PER_DIGEST_PASS, "right")) - 1
        last = min(max(last, first + 1), n_blocks)
        start = int(offsets[first])
        part = table.slice(start, int(offsets[last]) - start)
        versions = pc.fill_null(part.column("version"), "")
        line = pc.binary_join_element_wise(part.column("image_id"), versions, "\t")
        lines = pc.binary_join_element_wise(line, "\n", "").combine_chunks()  # "id\tversion\n"
        ends = np.frombuffer(lines.buffers()[1], np.int32, len(lines) + 1, lines.offset * 4)
        data = memoryview(lines.buffers()[2]) if lines.buffers()[2] else memoryview(b"")
        for b in range(first, last):
            lo, hi = ends[offsets[b] - start], ends[offsets[b + 1] - start]
            ids.append(hashlib.sha256(data[lo : hi - 1]).hexdigest()[:20])  # no last newline
        first = last
    return ids


def block_id(items: tuple[InputItem, ...]) -> str:
    """The id of one block of InputItems (what `block_ids` computes from columns)."""
    text = "\n".join(f"{it.image_id}\t{it.version}" for it in items)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _container_chunks(items: list[InputItem], block_size: int) -> list[list[int]]:
    """Positions in `items` of each block's rows: by file and row group, whatever the id
    order, so that a row group's rows are together."""

    def part(i: int):
        it = items[i]
        whole = it.member == ALL_SAMPLES
        return (it.meta["shard"], it.meta.get("row_group", -1), it.image_id if whole else "")

    def row(i: int) -> int:
        member = items[i].member
        return int(member) if member and member.isdigit() else -1

    ordered = sorted(range(len(items)), key=lambda i: (part(i), row(i), items[i].image_id))
    chunks: list[list[int]] = []
    current: list[int] = []
    for _, group in itertools.groupby(ordered, key=part):
        unit = list(group)
        small = items[unit[0]].member != ALL_SAMPLES and len(unit) <= block_size
        if small and len(current) + len(unit) <= block_size:
            current += unit
            continue
        if current:
            chunks.append(current)
            current = []
        if small:
            current = unit
            continue
        # a whole shard, or a row group bigger than a block: alone, sliced only when huge
        slices = -(-len(unit) // (MAX_ROW_GROUP_BLOCKS * block_size))
        step = -(-len(unit) // slices)
        chunks += [unit[s : s + step] for s in range(0, len(unit), step)]
    if current:
        chunks.append(current)
    return chunks
