"""Checkpoints: what a worker saves and restores, which checkpoint counts (complete or
invisible), `final/`, and the tokenizers a checkpoint records (the text tokenizer is
copied in, so a checkpoint is self-contained)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from omni_model import model_folder
from omni_model.model_folder import MODEL_FILES, TEXT_TOKENIZER_DIR
from omni_model.tokenizers.text import BPETokenizer
from omni_model.vocab import Vocab

if TYPE_CHECKING:
    from pipelines.train.parallelism import ParallelModel

logger = logging.getLogger(__name__)


TRAIN_STATE = "train_state.json"


def rank_manifest(rank: int) -> str:
    """The file in which a rank lists every file it wrote to a checkpoint, with its size."""
    return f"rank_{rank}.files.json"


def resolve_previous(path: str) -> Path:
    """`latest:RUN_DIR` -> that run's `final/`, else its newest checkpoint; else `path`."""
    if not path.startswith("latest:"):
        return Path(path)
    run = Path(path.split(":", 1)[1])
    if model_folder.has_weights(run / "final"):  # final/ appears whole (see export_final)
        return run / "final"
    latest = latest_checkpoint(run)
    if latest is None:
        raise FileNotFoundError(f"{run} has no final model and no checkpoint")
    return latest


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under a run folder (None if there
    is none); incomplete ones (a save cut short) are skipped with a warning."""
    best, best_step = None, -1
    for state in Path(run_dir).glob(f"*/checkpoint_*/{TRAIN_STATE}"):
        if not checkpoint_complete(state.parent):
            logger.warning("skipping incomplete checkpoint %s", state.parent)
            continue
        step = json.loads(state.read_text())["step"]
        if step > best_step:
            best, best_step = state.parent, step
    return best


def checkpoint_complete(folder: Path) -> bool:
    """Every rank's files are there at the sizes that rank recorded (each rank writes its
    own into a folder Ray merges; `rank_R.files.json` lists them), and `train_state.json`
    reads. Ray copies a reported checkpoint file by file, in no set order: a crash
    mid-copy leaves a folder with some files, or a file cut short."""
    try:
        state = json.loads((folder / TRAIN_STATE).read_text())
        world = int(state.get("world", 1))
        if state.get("manifests"):
            listed: dict[str, int] = {}
            for rank in range(world):
                listed |= json.loads((folder / rank_manifest(rank)).read_text())
        else:  # written before every rank listed its files: rank 0's list, ranks by existence
            if state.get("files") is None:  # before any list: the model is what must be there
                return model_folder.has_weights(folder)
            if not all((folder / f"rank_{r}.pt").is_file() for r in range(world)):
                return False
            listed = state["files"]
        files = {model_folder.inside(folder, name, "a listed checkpoint file"): size for name, size in listed.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    return all(path.is_file() and path.stat().st_size == size for path, size in files.items())


@contextlib.contextmanager
def restored_checkpoint(checkpoint, run_dir: str | Path | None = None
                        ) -> Iterator[tuple[Path | None, dict[str, Any]]]:
    """The checkpoint a worker resumes from, as a folder, and its `train_state.json`
    (None and step 0 without one). Ray's newest checkpoint when it is complete; when it
    is not (a file missing or cut short), the newest complete one under `run_dir`.

    A checkpoint on a local or mounted filesystem is read where it is; one elsewhere is
    downloaded to a temporary folder deleted on exit. (Each resume used to copy the whole
    checkpoint to a temporary folder nothing deleted: every restart of a worker group
    added one, up to a full disk.)"""
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if checkpoint_complete(Path(folder)):
                yield Path(folder), json.loads((Path(folder) / TRAIN_STATE).read_text())
                return
        logger.warning("checkpoint %s is incomplete (a file missing or cut short): not resumed from",
                       checkpoint.path)
        fallback = latest_checkpoint(run_dir) if run_dir is not None else None
        if fallback is not None:
            logger.warning("resuming from %s instead", fallback)
            yield fallback, json.loads((fallback / TRAIN_STATE).read_text())
            return
        logger.warning("no complete checkpoint: starting from the beginning")
    yield None, {"step": 0}


@dataclass
class TrainState:
    """A worker's own progress, saved in every checkpoint beside the model and optimizer."""

    rank: int
    world: int
    device: torch.device
    step: int  #: steps done
    samples_seen: int  #: samples this rank has taken from its stream (skipped on resume)
    generator: torch.Generator  #: the tail pads' draws
    nonfinite_skipped: int = 0  #: steps skipped for a non-finite loss or gradient norm, run total
    #: the generator's state after the last batch taken, where batches are made ahead
    #: (`BatchFeed`): what a checkpoint saves, so a resumed run draws what this one would
    pad_rng: torch.Tensor | None = None

    @classmethod
    def begin(cls, rank: int, world: int, device: torch.device, recorded: dict[str, Any],
              seed: int) -> "TrainState":
        """The state at the start of a run, or where `recorded` (a checkpoint's
        `train_state.json`) left it; `restore_rng` then restores the random streams."""
        step = int(recorded.get("step", 0))
        generator = torch.Generator().manual_seed(seed * 1000 + rank + 7 * step)
        samples = int(recorded.get("samples_seen", {}).get(str(rank), 0))
        return cls(rank, world, device, step, samples, generator, int(recorded.get("nonfinite_skipped", 0)))

    def restore_rng(self, resume_dir: Path | None) -> None:
        """Torch's and the generator's states as this rank saved them (when it did)."""
        if resume_dir is None or not (resume_dir / f"rank_{self.rank}.pt").exists():
            return
        saved = torch.load(resume_dir / f"rank_{self.rank}.pt", weights_only=True)
        torch.set_rng_state(saved["torch_rng"])
        self.generator.set_state(saved["generator"])
        logger.info("rank %d resumes at step %d", self.rank, self.step)


def save_checkpoint(folder: Path, state: TrainState, opt: ParallelModel, vocab: Vocab, config: dict) -> None:
    """A stage's checkpoint (`write_checkpoint`): rank 0 also writes the vocab, the
    tokenizers' record and a copy of the text tokenizer."""
    def model_files(folder: Path) -> None:
        vocab.save(folder)
        model_folder.write_tokenizers(folder, config.get("tokenizers", {}))
        text_tokenizer = config["stage"]["data"]["text_tokenizer"]
        if text_tokenizer:  # a checkpoint is self-contained: the text ids' meaning travels with it
            source = Path(text_tokenizer)
            (folder / TEXT_TOKENIZER_DIR).mkdir()
            shutil.copy(source / BPETokenizer.FILE if source.is_dir() else source,
                        folder / TEXT_TOKENIZER_DIR / BPETokenizer.FILE)

    write_checkpoint(folder, state, opt, config["stage"]["stage"], model_files)


def write_checkpoint(folder: Path, state: TrainState, opt: ParallelModel, stage: int | str,
                     model_files: Callable[[Path], None] | None = None) -> None:
    """Every rank writes its own state and its share of the optimizer (`opt.save`: rank 0
    the model too); rank 0 also `model_files(folder)` and `train_state.json`. Each rank
    then lists what it wrote, with sizes (`checkpoint_complete` checks the lists).
    Refuses (`NonFiniteTraining`, on every rank) weights that are not finite."""
    opt.check_finite()
    rank, world, device = state.rank, state.world, state.device
    generator = state.generator.get_state() if state.pad_rng is None else state.pad_rng
    torch.save({"torch_rng": torch.get_rng_state(), "generator": generator, "samples_seen": state.samples_seen},
               folder / f"rank_{rank}.pt")
    seen = [torch.tensor(state.samples_seen)]
    if world > 1 and torch.distributed.is_initialized():
        seen = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
        torch.distributed.all_gather(seen, torch.tensor(state.samples_seen, device=device))
    opt.save(folder, rank)
    if rank == 0:
        if model_files is not None:
            model_files(folder)
        (folder / TRAIN_STATE).write_text(json.dumps({
            "step": state.step, "samples_seen": {str(r): int(s) for r, s in enumerate(seen)},
            "stage": stage, "world": world, "manifests": True,
            "nonfinite_skipped": state.nonfinite_skipped}) + "\n")
    # written last, listing every file this rank wrote (Ray merges the ranks' folders);
    # train_state.json is checked by reading it
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
             if f.is_file() and f.name != TRAIN_STATE}
    (folder / rank_manifest(rank)).write_text(json.dumps(files) + "\n")


def export_final(checkpoint: Path, final: Path) -> None:
    """`final/`: the files `Transformer.from_pretrained` and the sampler read, nothing else.
    Written to a temporary folder renamed into place, so it is whole or absent; refused
    (`NonFiniteTraining`) when a weight is NaN or inf."""
    from safetensors import safe_open

    from pipelines.train.guards import check_finite_weights

    with safe_open(str(checkpoint / model_folder.WEIGHTS_FILE), framework="pt") as weights:  # one tensor at a time
        check_finite_weights((name, weights.get_tensor(name)) for name in weights.keys())
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (*MODEL_FILES, TRAIN_STATE):
        shutil.copy(checkpoint / name, tmp / name)
    if (checkpoint / TEXT_TOKENIZER_DIR).is_dir():
        shutil.copytree(checkpoint / TEXT_TOKENIZER_DIR, tmp / TEXT_TOKENIZER_DIR)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def text_tokenizer_entry(path: str | None) -> dict | None:
    """`tokenizers.json`'s text entry: the copy inside the checkpoint and its fingerprint
    (None: the byte-level tokenizer, which needs no file)."""
    if not path:
        return None
    return {"path": TEXT_TOKENIZER_DIR, "fingerprint": BPETokenizer.from_pretrained(path).fingerprint,
            "source": path}


def check_text_tokenizer(previous: Path, entry: dict | None) -> None:
    """A stage that continues another must read text with the same tokenizer."""
    recorded = model_folder.read_tokenizers(previous).get("text")
    theirs = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    mine = entry["fingerprint"] if entry else None
    if isinstance(recorded, dict) and theirs != mine:
        raise ValueError(f"{previous} was trained with text tokenizer {theirs}; data.text_tokenizer is "
                         f"{mine}: the text ids would change meaning")
