"""Manifest -> token shards, on Ray Data.

    validate rows -> image tokenizer actors -> speech tokenizer actors -> write_parquet

Each stage is a plain `batch -> batch` callable (tests call them without Ray); the Ray
wiring is `tokenize_manifest`. Tokenizer actors load their model once (`map_batches`
with a callable class and an `ActorPoolStrategy`), encode a whole batch at a time and
ask for a GPU each when the config says so.

Reliability: row content never stops the job. Every exception while parsing,
validating, opening, decoding or encoding a row sends that row to quarantine with the
reason; only infrastructure (disk, Ray) can fail a run, with a message saying so. What
a row may cost is bounded by its work, not by counting rows: validation reads every
media file's header (regular files within `max_file_bytes`; pixels, rate, channels,
length) and sums the row's decoded bytes against `max_row_decoded_bytes`, so a row
naming a large image 64 times is quarantined before an actor decodes any of it.

Resume bookkeeping: the manifest is cut into parts of `rows_per_part` lines. Parts are
processed in waves; a wave's output is written by Ray Data to a staging folder, then
committed part by part: the part's old marker removed, its old shard and quarantine
files removed, the new ones renamed into place (`shards/part-NNNNN-KKK.parquet`,
`quarantine/part-NNNNN.parquet`), and last the marker `_parts/part-NNNNN.json` that
lists them with the part's line range and a digest of its lines. Readers read only the
files a marker lists, so a part is in the set whole or not at all. `_run.json` records
the manifest's name, `rows_per_part` and the tokenizers: a re-run with another part
size or other tokenizers into the same folder is refused; a re-run after the manifest
changed redoes exactly the parts whose lines changed (and drops parts past its end); a
re-run of an unchanged manifest does nothing. Every input line ends in a shard or in
quarantine, with the reason. The commit, the markers and `_run.json` are `shards.py`'s.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from omni_model.templates import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, PLACEHOLDERS
from omni_model.tokenizers import load_image_tokenizer, load_speech_tokenizer
from omni_model.tokenizers.mel import resample, to_mono
from pipelines.data.manifest import ManifestError, parse_line, read_bounded_lines, resolve_media, sample_id
from pipelines.data.media import MediaError, MediaLimits, check_row_media, load_audio, load_image
from pipelines.data.shards import (SHARD_SCHEMA, SUCCESS_FILE, atomic_write_text, claim_run, commit_part,
                                   committed_parts, image_part, manifest_fingerprint, part_digest, shard_files,
                                   speech_part, text_part, tokenizer_identity, uncommit_part)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizeConfig:
    manifest: str = "runs/world/manifests/all.jsonl"  #: JSONL manifest
    data_root: str = "runs/world"  #: media paths are relative to this folder
    out: str = "runs/shards/world"  #: shard set folder
    image_tokenizer: str | None = "runs/tokenizers/image"  #: anything MagVitTokenizer.from_pretrained reads
    speech_tokenizer: str | None = "runs/tokenizers/speech"  #: a GLM-4-Voice tokenizer or SpeechCodec folder
    rows_per_part: int = 512  #: manifest lines per committed part (and per shard file at most)
    max_shard_bytes: int = 256 * 2**20  #: a part's shard is split into files below this size
    parts_per_wave: int = 8  #: parts processed by one Ray Data execution
    batch_size: int = 32  #: rows per tokenizer batch
    image_workers: int = 1  #: image tokenizer actors
    speech_workers: int = 1  #: speech tokenizer actors
    num_cpus_per_worker: float = 0.5
    num_gpus_per_worker: float = 0.0  #: > 0 on GPU clusters (the actors then use CUDA)
    max_image_pixels: int = 40_000_000  #: width x height of one image, from its header
    max_audio_seconds: float = 600.0  #: length of one audio file, from its header
    max_sample_rate: int = 192_000  #: audio above this rate is refused (read from the header)
    max_channels: int = 8  #: audio with more channels is refused
    max_line_bytes: int = 1_000_000  #: a longer manifest line is quarantined unparsed
    max_file_bytes: int = 256 * 2**20  #: a larger media file (or anything not a regular file) is refused
    max_media_per_row: int = 64  #: media files one row may name
    #: a row's media decoded (RGB at 4 bytes a pixel, float32 audio), summed from their
    #: headers before any is decoded: what one row may cost a tokenizer actor
    max_row_decoded_bytes: int = 256 * 2**20

    def media_limits(self) -> MediaLimits:
        """The media limits of this config, checked per file and per row."""
        return MediaLimits(self.max_file_bytes, self.max_image_pixels, self.max_audio_seconds,
                           self.max_sample_rate, self.max_channels, self.max_media_per_row,
                           self.max_row_decoded_bytes)



# ---------------------------------------------------------------------- stages
def row_error(err: BaseException) -> str:
    """A quarantine reason for any exception a row raised: our own errors say why in
    their message; anything else is named by its type too."""
    if isinstance(err, (ManifestError, MediaError)):
        return str(err)
    return f"{type(err).__name__}: {err}"[:2000]


def validate_rows(batch: dict[str, np.ndarray], data_root: str, max_line_bytes: int | None = None,
                  limits: MediaLimits | None = None) -> dict[str, np.ndarray]:
    """Parse and check manifest lines; bad ones get a `reason` (quarantine).

    With `limits`, a row's media are checked from the file system and their headers
    (`check_row_media`): a row whose media, together, would decode past the row's
    budget is quarantined here, before any tokenizer actor decodes them.
    """
    root = Path(data_root)
    limits = limits or MediaLimits()
    samples, reasons = [], []
    sizes = batch["bytes"] if "bytes" in batch else [0] * len(batch["raw"])
    for raw, size in zip(batch["raw"], sizes):
        try:
            if max_line_bytes is not None and int(size) > max_line_bytes:
                raise ManifestError(f"line of {int(size)} bytes is over the limit of {max_line_bytes}")
            sample = parse_line(str(raw), root, max_media=limits.max_media_per_row)
            check_row_media([resolve_media(root, rel) for rel in sample.images],
                            [resolve_media(root, rel) for rel in sample.audios], limits)
            samples.append(json.dumps(asdict(sample)))
            reasons.append("")
        except Exception as err:  # noqa: BLE001 - row content never stops the job
            samples.append("")
            reasons.append(row_error(err))
    n = len(batch["raw"])
    return {**batch, "sample": np.array(samples, dtype=object),
            "reason": np.array(reasons, dtype=object),
            "image_codes": np.array(["[]"] * n, dtype=object),
            "audio_codes": np.array(["[]"] * n, dtype=object),
            **{key: np.zeros(n) for key in TIMING_COLUMNS}}


#: Seconds each stage spent reading media vs running the tokenizer, spread over its rows.
TIMING_COLUMNS = ("image_io_s", "image_encode_s", "speech_io_s", "speech_encode_s")


def _spread(batch: dict, key: str, seconds: float) -> np.ndarray:
    n = len(batch["raw"])
    return batch[key] + seconds / max(1, n)


def _encode_or_isolate(encode, groups: list, sizes: list[int]) -> list:
    """Encode all rows' media in one call; if that fails, row by row, so one input that
    breaks the tokenizer costs only its own row (returned as the exception)."""
    try:
        flat = encode(groups)
    except Exception:  # noqa: BLE001 - any tokenizer failure is isolated below
        logger.exception("batched encode failed; retrying row by row")
        out = []
        for g in groups:
            try:
                out.append(encode([g]))
            except Exception as err:  # noqa: BLE001
                out.append(err)
        return out
    out, k = [], 0
    for n in sizes:
        out.append(flat[k:k + n])
        k += n
    return out


class _TokenizerStage:
    """Shared plumbing: which rows are still good, how failures are recorded."""

    column: str  # "images" or "audios"

    def __init__(self, data_root: str) -> None:
        self.root = Path(data_root)

    def _todo(self, batch: dict) -> list[tuple[int, dict]]:
        out = []
        for i, (reason, sample) in enumerate(zip(batch["reason"], batch["sample"])):
            if not reason:
                s = json.loads(sample)
                if s[self.column]:
                    out.append((i, s))
        return out


class ImageStage(_TokenizerStage):
    """Load, normalise and encode every image of the batch's rows in one tokenizer call."""

    column = "images"

    def __init__(self, data_root: str, tokenizer_path: str, device: str = "cpu",
                 max_pixels: int = 40_000_000) -> None:
        super().__init__(data_root)
        self.tokenizer = load_image_tokenizer(tokenizer_path, device)
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reasons, codes_out = list(batch["reason"]), list(batch["image_codes"])
        pixels, owners = [], []
        start = time.perf_counter()
        for i, s in self._todo(batch):
            try:
                imgs = [load_image(resolve_media(self.root, rel), self.max_pixels) for rel in s["images"]]
                pixels.append(self.tokenizer.preprocess(imgs))
            except Exception as err:  # noqa: BLE001 - row content never stops the job
                reasons[i] = f"image: {row_error(err)}"
                continue
            owners.append(i)
        loaded = time.perf_counter()
        if pixels:
            grid = list(self.tokenizer.grid_for(*pixels[0].shape[-2:]))
            encoded = _encode_or_isolate(lambda xs: self.tokenizer.encode(torch.cat(xs)).cpu().tolist(),
                                         pixels, [len(p) for p in pixels])
            for i, codes in zip(owners, encoded):
                if isinstance(codes, Exception):
                    reasons[i] = f"image: tokenizer failed: {row_error(codes)}"
                else:
                    codes_out[i] = json.dumps([[c, grid] for c in codes])
        return {**batch, "reason": np.array(reasons, dtype=object),
                "image_codes": np.array(codes_out, dtype=object),
                "image_io_s": _spread(batch, "image_io_s", loaded - start),
                "image_encode_s": _spread(batch, "image_encode_s", time.perf_counter() - loaded)}


class SpeechStage(_TokenizerStage):
    """Load (any rate, channels, WAV/FLAC), resample and encode the batch's audio."""

    column = "audios"

    def __init__(self, data_root: str, tokenizer_path: str, device: str = "cpu",
                 max_seconds: float = 600.0, max_sample_rate: int = 192_000,
                 max_channels: int = 8) -> None:
        super().__init__(data_root)
        self.tokenizer = load_speech_tokenizer(tokenizer_path, device, decoder=False)
        self.limits = {"max_seconds": max_seconds, "max_sample_rate": max_sample_rate,
                       "max_channels": max_channels}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reasons, codes_out = list(batch["reason"]), list(batch["audio_codes"])
        waves, owners = [], []
        start = time.perf_counter()
        for i, s in self._todo(batch):
            try:
                loaded = [load_audio(resolve_media(self.root, rel), **self.limits) for rel in s["audios"]]
                prepared = [resample(to_mono(a), rate, self.tokenizer.mel.sample_rate)
                            for a, rate in loaded]
            except Exception as err:  # noqa: BLE001 - row content never stops the job
                reasons[i] = f"audio: {row_error(err)}"
                continue
            waves.append(prepared)
            owners.append(i)
        loaded = time.perf_counter()
        if waves:
            rate = self.tokenizer.mel.sample_rate
            encoded = _encode_or_isolate(
                lambda groups: [c.tolist() for c in self.tokenizer.encode([w for g in groups for w in g], rate)],
                waves, [len(ws) for ws in waves])
            for i, codes in zip(owners, encoded):
                if isinstance(codes, Exception):
                    reasons[i] = f"audio: tokenizer failed: {row_error(codes)}"
                else:
                    codes_out[i] = json.dumps(codes)
        return {**batch, "reason": np.array(reasons, dtype=object),
                "audio_codes": np.array(codes_out, dtype=object),
                "speech_io_s": _spread(batch, "speech_io_s", loaded - start),
                "speech_encode_s": _spread(batch, "speech_encode_s", time.perf_counter() - loaded)}


def shard_row(row: dict, source: str, frame_rate: float) -> dict:
    """A validated, tokenized pipeline row -> a SHARD_SCHEMA row."""
    sample = json.loads(row["sample"])
    images = iter(json.loads(row["image_codes"]))
    audios = iter(json.loads(row["audio_codes"]))
    messages = []
    for m in sample["messages"]:
        parts = []
        for piece in PLACEHOLDERS.split(m["content"]):
            if piece == IMAGE_PLACEHOLDER:
                codes, grid = next(images)
                parts.append(image_part(codes, grid))
            elif piece == AUDIO_PLACEHOLDER:
                parts.append(speech_part(next(audios), frame_rate))
            elif piece:
                parts.append(text_part(piece))
        messages.append({"role": m["role"], "parts": parts})
    return {"sample_id": row["sample_id"], "task": sample["task"], "source": source,
            "line": int(row["line"]), "messages": messages,
            "meta": json.dumps(sample.get("meta") or {})}


# ---------------------------------------------------------------------- driver
def read_parts(manifest: Path, rows_per_part: int, max_line_bytes: int | None = None) -> list[list[dict]]:
    """The manifest's non-blank lines as pipeline rows, cut into parts."""
    source = manifest.name
    rows = [{"line": n, "raw": raw, "bytes": size, "sample_id": sample_id(source, n, raw)}
            for n, raw, size in read_bounded_lines(manifest, max_line_bytes)]
    return [rows[i:i + rows_per_part] for i in range(0, len(rows), rows_per_part)]


def _build_dataset(rows: list[dict], cfg: TokenizeConfig):
    import ray

    device = "cuda" if cfg.num_gpus_per_worker > 0 else "cpu"
    ds = ray.data.from_items(rows).map_batches(
        validate_rows, fn_kwargs={"data_root": cfg.data_root, "max_line_bytes": cfg.max_line_bytes,
                                  "limits": cfg.media_limits()},
        batch_size=cfg.batch_size, num_cpus=0.25)
    stages = []
    if cfg.image_tokenizer:
        stages.append((ImageStage, (cfg.data_root, cfg.image_tokenizer, device, cfg.max_image_pixels),
                       cfg.image_workers))
    if cfg.speech_tokenizer:
        stages.append((SpeechStage, (cfg.data_root, cfg.speech_tokenizer, device, cfg.max_audio_seconds,
                                     cfg.max_sample_rate, cfg.max_channels), cfg.speech_workers))
    for stage, args, workers in stages:
        ds = ds.map_batches(stage, fn_constructor_args=args, batch_size=cfg.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=cfg.num_cpus_per_worker, num_gpus=cfg.num_gpus_per_worker)
    return ds


def _missing_tokenizer(row: dict, cfg: TokenizeConfig) -> str:
    if row["reason"]:
        return row["reason"]
    sample = json.loads(row["sample"])
    if sample["images"] and not cfg.image_tokenizer:
        return "row has images but no image tokenizer was given"
    if sample["audios"] and not cfg.speech_tokenizer:
        return "row has audio but no speech tokenizer was given"
    return ""


def _commit(staging: Path, wave: dict[int, list[dict]], out: Path, cfg: TokenizeConfig,
            identity: dict, frame_rate: float, fingerprint: str) -> dict[str, float]:
    """Move a wave's staged rows into per-part shard and quarantine files."""
    table = pq.read_table(staging) if any(staging.glob("*.parquet")) else None
    staged = {r["sample_id"]: r for r in (table.to_pylist() if table is not None else [])}
    totals = {"rows": 0, "shard_rows": 0, "quarantined": 0, **{k: 0.0 for k in TIMING_COLUMNS}}
    for r in staged.values():
        for key in TIMING_COLUMNS:
            totals[key] += float(r.get(key) or 0.0)
    source = Path(cfg.manifest).name
    for index, rows in sorted(wave.items()):
        good, failed = [], {}
        for row in rows:
            done = staged.get(row["sample_id"])
            try:
                reason = "lost in the pipeline (no output row)" if done is None else _missing_tokenizer(done, cfg)
                if not reason:
                    good.append(shard_row(done, source, frame_rate))
                    continue
            except Exception as err:  # noqa: BLE001 - row content never stops the job
                reason = f"could not build the shard row: {row_error(err)}"
            failed[row["sample_id"]] = reason
        good, unstorable = _storable(good)
        failed.update(unstorable)
        bad = [{"sample_id": row["sample_id"], "source": source, "line": row["line"],
                "reason": failed[row["sample_id"]], "raw": row["raw"][:20000]}
               for row in rows if row["sample_id"] in failed]
        counts = commit_part(out, index, rows, good, bad, cfg.rows_per_part, cfg.max_shard_bytes,
                             identity, fingerprint)
        for key in counts:
            totals[key] += counts[key]
    return totals


def _storable(rows: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The shard rows Arrow can store, and a reason for each it cannot (tried row by
    row only when the whole list fails)."""
    try:
        pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
        return rows, {}
    except Exception:  # noqa: BLE001 - isolated below
        kept, failed = [], {}
        for row in rows:
            try:
                pa.Table.from_pylist([row], schema=SHARD_SCHEMA)
                kept.append(row)
            except Exception as err:  # noqa: BLE001
                failed[row["sample_id"]] = f"could not store the shard row: {row_error(err)}"
        return kept, failed


def tokenize_manifest(cfg: TokenizeConfig) -> dict[str, Any]:
    """Run the pipeline on a started Ray; returns (and writes) the run summary."""
    start = time.perf_counter()
    out = Path(cfg.out)
    manifest = Path(cfg.manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    image_tok = load_image_tokenizer(cfg.image_tokenizer) if cfg.image_tokenizer else None
    speech_tok = load_speech_tokenizer(cfg.speech_tokenizer, decoder=False) if cfg.speech_tokenizer else None
    identity = tokenizer_identity(image_tok, speech_tok)
    frame_rate = speech_tok.codes_per_second if speech_tok is not None else 0.0
    del image_tok, speech_tok

    parts = read_parts(manifest, cfg.rows_per_part, cfg.max_line_bytes)
    fingerprint = manifest_fingerprint(parts)
    claim_run(out, {"source": manifest.name, "rows_per_part": cfg.rows_per_part, "tokenizers": identity})
    committed = committed_parts(out)
    pending = [i for i, rows in enumerate(parts) if committed.get(i, {}).get("digest") != part_digest(rows)]
    beyond = sorted(i for i in committed if i >= len(parts))
    changed = [i for i in pending if i in committed]
    if changed or beyond:
        logger.warning("%s changed since parts were committed: redoing parts %s, dropping parts %s",
                       manifest, changed, beyond)
    if pending or beyond:
        (out / SUCCESS_FILE).unlink(missing_ok=True)  # the set is being changed
    for i in beyond:
        uncommit_part(out, i)
    logger.info("%s: %d lines in %d parts, %d to do", manifest, sum(map(len, parts)), len(parts),
                len(pending))
    totals = {"rows": 0, "shard_rows": 0, "quarantined": 0, **{k: 0.0 for k in TIMING_COLUMNS}}
    for w in range(0, len(pending), cfg.parts_per_wave):
        wave = {i: parts[i] for i in pending[w:w + cfg.parts_per_wave]}
        staging = out / "_staging" / f"wave-{min(wave):05d}"
        shutil.rmtree(staging, ignore_errors=True)
        rows = [{**r, "part": i} for i, rs in wave.items() for r in rs]
        try:
            _build_dataset(rows, cfg).write_parquet(str(staging))
        except Exception as err:
            raise RuntimeError(
                f"the pipeline failed on parts {sorted(wave)} of {manifest}: {type(err).__name__}: "
                f"{str(err)[:500]}. Row content goes to quarantine and never stops the job, so "
                "this is the infrastructure (disk, memory, Ray); committed parts are kept and "
                "a re-run resumes with the parts left") from err
        counts = _commit(staging, wave, out, cfg, identity, frame_rate, fingerprint)
        shutil.rmtree(staging, ignore_errors=True)
        for key in totals:
            totals[key] += counts[key]
    shutil.rmtree(out / "_staging", ignore_errors=True)
    elapsed = time.perf_counter() - start
    summary = _summarise(out, len(parts), identity, fingerprint, cfg, totals, elapsed)
    atomic_write_text(out / SUCCESS_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def _summarise(out: Path, n_parts: int, identity: dict, fingerprint: str, cfg: TokenizeConfig,
               this_run: dict, elapsed: float) -> dict:
    markers = committed_parts(out)
    all_counts = {key: sum(markers[i][key] for i in range(n_parts))
                  for key in ("rows", "shard_rows", "quarantined")}
    tasks: dict[str, int] = {}
    files = shard_files(out)
    for f in files:
        for t in pq.read_table(f, columns=["task"]).column("task").to_pylist():
            tasks[t] = tasks.get(t, 0) + 1
    return {"manifest": str(cfg.manifest), "manifest_fingerprint": fingerprint, "tokenizers": identity,
            "totals": all_counts, "tasks": tasks, "shard_files": [f.name for f in files],
            "this_run": {**this_run, "seconds": elapsed,
                         "samples_per_second": this_run["rows"] / elapsed if elapsed else 0.0},
            "config": asdict(cfg)}
