"""WebDataset shards, each read once, by the block that explains it.

The listing never opens a shard: it lists one item per shard (member `ALL_SAMPLES`), and a
block is one shard. `read_shard` fetches the shard in one GET and expands it into its samples:
members sharing a key (`a/b/0001.jpg`, `a/b/0001.cls`) are one sample, labelled by its `.cls`
or `.json` (`label` or `label_index`) member, with image id `<shard id>/<key>`.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile

from ..storage import Storage
from .inputs import ALL_SAMPLES, InputItem
from .listing import IMAGE_EXTENSIONS, _files_under, _unstrip, file_version
from .objects import read_object

_SIDECARS = (".cls", ".json")


def list_shards(uri: str, storage: Storage) -> list[InputItem]:
    """One item per `.tar` under `uri`; its id is the shard's path relative to the source."""
    fs, root, files = _files_under(uri, storage)
    items = []
    for path in (p for p in files if p.endswith(".tar")):
        shard = _unstrip(uri, fs, path)
        items.append(
            InputItem(
                posixpath.relpath(path, root),
                shard,
                ALL_SAMPLES,
                meta={"shard": shard},
                version=file_version(files[path]),
            )
        )
    return items


def read_shard(shard: InputItem, storage: Storage) -> list[tuple]:
    """(sample item, image bytes or its exception) for every sample of a shard, by image id.
    A shard cut short keeps the samples before the cut and adds one error for the shard."""
    members: dict[str, bytes] = {}
    broken = None
    try:
        data = read_object(shard.uri, storage)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for m in tar:
                ext = posixpath.splitext(m.name)[1].lower()
                if m.isfile() and (ext in IMAGE_EXTENSIONS or ext in _SIDECARS):
                    members[m.name] = tar.extractfile(m).read()
            end = tar.offset
        # tarfile ends quietly where a header is cut short or missing: an archive that was
        # written whole ends in zero blocks
        rest = data[end:]
        if len(rest) < tarfile.BLOCKSIZE or rest.strip(b"\0"):
            raise tarfile.ReadError(f"cut short or corrupt at byte {end}")
    except (tarfile.TarError, EOFError) as e:
        broken = e
    samples = []
    for name in sorted(members):
        key, ext = posixpath.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            label = _label(members, key)
        except (ValueError, UnicodeDecodeError) as e:
            label, error = None, ValueError(f"{name}: unreadable label ({e})")
        else:
            error = None
        item = InputItem(
            f"{shard.image_id}/{key}",
            shard.uri,
            name,
            label,
            {"shard": shard.uri},
            version=shard.version,
        )
        samples.append((item, error or members[name]))
    if broken is not None:
        where = f" after {len(samples)} samples" if samples else ""
        samples.append((shard, tarfile.ReadError(f"{shard.uri}: unreadable tar{where}: {broken}")))
    return samples


def read_member(items: list[InputItem], storage: Storage) -> list[tuple]:
    """(item, bytes or exception) for sample items of one shard (`member` = tar member name,
    as heatmap rows carry it): one GET of the shard for all of them."""
    data = read_object(items[0].uri, storage)
    # in memory, nothing to close
    tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115
    out = []
    for it in items:
        try:
            member = tar.extractfile(it.member)
        except KeyError:
            member = None
        out.append((it, member.read() if member else FileNotFoundError(f"no member {it.member!r}")))
    return out


def _label(members: dict[str, bytes], key: str):
    if key + ".cls" in members:
        return int(members[key + ".cls"].decode().strip())
    if key + ".json" in members:
        meta = json.loads(members[key + ".json"])
        if not isinstance(meta, dict):
            raise ValueError(f"{key}.json is not an object")
        return meta.get("label", meta.get("label_index"))
    return None
