"""Parquet token shards: the schema, the writer, the reader, the quarantine table, and the
commit of a shard set's parts.

One row a sample: a stable `sample_id`, `task`, `source` (manifest name) and `line`, and
the messages with each media part replaced by its codes (`list<int32>`, plus the grid
for images and the frame rate for speech); text stays text, so shards do not depend on
the backbone's text tokenizer. Every file's footer records the image and speech
tokenizer identities (name + fingerprint); `read_shards` refuses to mix shard sets made
with different tokenizers.

Rows that cannot be used go to the quarantine table instead (`source`, `line`,
`sample_id`, `reason`, the raw line): every input row ends in exactly one of the two.

A shard set written by the tokenize job is read through its part markers
(`_parts/part-NNNNN.json`, each written after its files): only the files of committed
parts are read, so a part whose commit was interrupted is never half in the set. The
writing half is here too: `commit_part` removes a part's old marker and files, writes the
new ones and the marker last; `claim_run` records a run's fixed parameters (`_run.json`)
and refuses a folder made with other ones; `committed_parts` reads the markers back.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from omni_model.templates import Image, Message, Part, Speech, Text

FORMAT_VERSION = 1
TOKENIZERS_KEY = b"omni.tokenizers"
SUCCESS_FILE = "_SUCCESS.json"
#: one marker per committed part; it lists the part's files
PARTS_DIR = "_parts"
#: The run's fixed parameters; a re-run into the same folder must match them.
RUN_FILE = "_run.json"

PART = pa.struct([
    ("type", pa.string()),  # text | image | speech
    ("text", pa.string()),
    ("codes", pa.list_(pa.int32())),
    ("grid", pa.list_(pa.int32())),  # [height, width] of an image's code grid
    ("frame_rate", pa.float32()),  # codes per second of speech
])
MESSAGE = pa.struct([("role", pa.string()), ("parts", pa.list_(PART))])
SHARD_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("task", pa.string()), ("source", pa.string()),
    ("line", pa.int64()), ("messages", pa.list_(MESSAGE)), ("meta", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("source", pa.string()), ("line", pa.int64()),
    ("reason", pa.string()), ("raw", pa.string()),
])


class ShardError(ValueError):
    """Shards that cannot be read together (incompatible tokenizers, bad files)."""


def text_part(text: str) -> dict:
    return {"type": "text", "text": text, "codes": None, "grid": None, "frame_rate": None}


def image_part(codes: Sequence[int], grid: Sequence[int]) -> dict:
    return {"type": "image", "text": None, "codes": list(map(int, codes)), "grid": list(grid),
            "frame_rate": None}


def speech_part(codes: Sequence[int], frame_rate: float) -> dict:
    return {"type": "speech", "text": None, "codes": list(map(int, codes)), "grid": None,
            "frame_rate": float(frame_rate)}


def to_messages(row: dict) -> list[Message]:
    """A shard row -> template messages (local codes; the vocab maps them to ids)."""
    out = []
    for m in row["messages"]:
        parts: list[Part] = []
        for p in m["parts"]:
            if p["type"] == "text":
                parts.append(Text(p["text"]))
            elif p["type"] == "image":
                parts.append(Image(tuple(p["codes"]), tuple(p["grid"]) if p["grid"] else None))
            elif p["type"] == "speech":
                parts.append(Speech(tuple(p["codes"]), p["frame_rate"]))
            else:
                raise ShardError(f"unknown part type {p['type']!r} in {row.get('sample_id')}")
        out.append(Message(m["role"], tuple(parts)))
    return out


def tokenizer_identity(image: Any | None, speech: Any | None) -> dict:
    """The identities recorded in every shard footer."""
    def ident(tok: Any | None) -> dict | None:
        if tok is None:
            return None
        return {"name": getattr(tok, "name", type(tok).__name__), "fingerprint": tok.fingerprint,
                "codebook_size": int(tok.codebook_size)}
    return {"format_version": FORMAT_VERSION, "image": ident(image), "speech": ident(speech)}


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file by renaming a finished temporary file over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _atomic_write(table: pa.Table, path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               TOKENIZERS_KEY: json.dumps(metadata).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def write_shard(rows: list[dict], path: str | Path, identity: dict) -> None:
    """Write shard rows (dicts in SHARD_SCHEMA) to one Parquet file, atomically."""
    _atomic_write(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), Path(path), identity)


def write_quarantine(rows: list[dict], path: str | Path) -> None:
    _atomic_write(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA), Path(path))


def _committed(root: Path, kind: str) -> list[Path] | None:
    """The `kind` files ("shards" or "quarantine") its part markers list; None when the
    folder has no markers (a plain folder of Parquet files)."""
    markers = root / PARTS_DIR
    if not markers.is_dir():
        return None
    files = []
    for marker in sorted(markers.glob("part-*.json")):
        record = json.loads(marker.read_text())
        names = record.get(kind)
        if kind == "shards":
            files += [root / "shards" / n for n in names]
        elif names:
            files.append(root / "quarantine" / names)
    return files


def shard_files(root: str | Path) -> list[Path]:
    """The shard files of a shard set: those of its committed parts, or every Parquet
    file of a folder without part markers (its `shards/` folder, or the folder itself)."""
    root = Path(root)
    committed = _committed(root, "shards")
    if committed is not None:
        return committed
    folder = root / "shards" if (root / "shards").is_dir() else root
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def read_identity(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if TOKENIZERS_KEY not in meta:
        raise ShardError(f"{path} carries no tokenizer identity: not a token shard")
    return json.loads(meta[TOKENIZERS_KEY])


def check_compatible(roots: Iterable[str | Path]) -> dict:
    """The common tokenizer identity of shard sets; raises ShardError when they differ.

    A set without image (or speech) rows may have no identity for that modality; it
    is compatible with any.
    """
    common: dict = {"format_version": FORMAT_VERSION, "image": None, "speech": None}
    for root in roots:
        files = shard_files(root)
        if not files:
            raise ShardError(f"no shard files under {root}")
        for path in files:
            ident = read_identity(path)
            if ident.get("format_version") != FORMAT_VERSION:
                raise ShardError(f"{path}: shard format {ident.get('format_version')} is not "
                                 f"{FORMAT_VERSION}")
            for kind in ("image", "speech"):
                mine, theirs = common[kind], ident.get(kind)
                if theirs is None:
                    continue
                if mine is None:
                    common[kind] = theirs
                elif mine["fingerprint"] != theirs["fingerprint"]:
                    raise ShardError(f"{path} was made with {kind} tokenizer {theirs['fingerprint']}"
                                     f", other shards with {mine['fingerprint']}: re-tokenize")
    return common


def read_shards(roots: str | Path | Sequence[str | Path]) -> pa.Table:
    """All rows of one or more compatible shard sets, as one Arrow table."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    check_compatible(roots)
    return pa.concat_tables([pq.read_table(p, schema=SHARD_SCHEMA) for r in roots
                             for p in shard_files(r)])


def read_quarantine(root: str | Path) -> pa.Table:
    """The quarantined rows of a shard set (of its committed parts)."""
    files = _committed(Path(root), "quarantine")
    if files is None:
        files = sorted((Path(root) / "quarantine").glob("*.parquet"))
    if not files:
        return QUARANTINE_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=QUARANTINE_SCHEMA) for p in files])


# ---------------------------------------------------------------------- committing parts
def part_digest(rows: list[dict]) -> str:
    """What a part holds: its lines' numbers and contents (through their sample ids)."""
    return hashlib.sha256("\n".join(r["sample_id"] for r in rows).encode()).hexdigest()[:32]


def manifest_fingerprint(parts: list[list[dict]]) -> str:
    return hashlib.sha256("\n".join(map(part_digest, parts)).encode()).hexdigest()[:32]


def _part_name(index: int) -> str:
    return f"part-{index:05d}"


def uncommit_part(out: Path, index: int) -> None:
    """Take a part out of the set: its marker first (readers skip it from then on), then
    its files."""
    name = _part_name(index)
    (out / PARTS_DIR / f"{name}.json").unlink(missing_ok=True)
    for old in [*(out / "shards").glob(f"{name}-*.parquet"), out / "quarantine" / f"{name}.parquet"]:
        old.unlink(missing_ok=True)


def commit_part(out: Path, index: int, rows: list[dict], good: list[dict], bad: list[dict],
                rows_per_part: int, max_shard_bytes: int, identity: dict, fingerprint: str) -> dict[str, int]:
    """Replace a part's shard and quarantine files together; the marker, written last,
    commits them."""
    name = _part_name(index)
    uncommit_part(out, index)
    shards = []
    for k, chunk in enumerate(_by_bytes(good, max_shard_bytes)):
        shards.append(f"{name}-{k:03d}.parquet")
        write_shard(chunk, out / "shards" / shards[-1], identity)
    if bad:
        write_quarantine(bad, out / "quarantine" / f"{name}.parquet")
    counts = {"rows": len(rows), "shard_rows": len(good), "quarantined": len(bad)}
    atomic_write_text(out / PARTS_DIR / f"{name}.json", json.dumps({
        **counts, "part": index, "first_line": rows[0]["line"], "last_line": rows[-1]["line"],
        "rows_per_part": rows_per_part, "digest": part_digest(rows), "manifest": fingerprint,
        "shards": shards, "quarantine": f"{name}.parquet" if bad else None}))
    return counts


def _by_bytes(rows: list[dict], max_bytes: int) -> list[list[dict]]:
    chunks: list[list[dict]] = [[]]
    size = 0
    for row in rows:
        est = 64 + sum(4 * len(p["codes"] or []) + len(p["text"] or "") for m in row["messages"]
                       for p in m["parts"])
        if chunks[-1] and size + est > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(row)
        size += est
    return [c for c in chunks if c]


def claim_run(out: Path, run: dict) -> None:
    """Record the run's fixed parameters, or refuse a folder made with other ones."""
    path = out / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        for key, value in run.items():
            if previous.get(key) != value:
                raise ValueError(
                    f"{out} holds parts made with {key}={json.dumps(previous.get(key))}; this run "
                    f"has {key}={json.dumps(value)}. Mixing them would lose or duplicate rows: "
                    f"use a new --out (or the same {key})")
        return
    atomic_write_text(path, json.dumps(run, indent=2) + "\n")


def committed_parts(out: Path) -> dict[int, dict]:
    """The markers of the committed parts of a shard set, by part index."""
    return {int(m.stem.split("-")[1]): json.loads(m.read_text())
            for m in sorted((out / PARTS_DIR).glob("part-*.json"))}
