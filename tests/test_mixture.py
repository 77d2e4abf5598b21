"""The training mixture's read rules on real Parquet files: source shares and task weights."""

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omni_model.config import from_dict
from pipelines.train import DataConfig, DataSource, mixture_rules, read_mixture


def _shard_set(root: Path, tasks: dict[str, int], files: int = 4) -> Path:
    """A shard-set folder whose files hold rows of the given tasks (only the column the
    mixture reads matters here)."""
    folder = root / "shards"
    folder.mkdir(parents=True)
    rows = [t for t, n in tasks.items() for _ in range(n)]
    for i in range(files):
        pq.write_table(pa.table({"task": rows[i::files], "row": list(range(len(rows)))[i::files]}),
                       folder / f"part-{i:05d}.parquet")
    return root


def _read(rules, repeats, folders, passes: int) -> Counter:
    """Every listing of every file, as build_dataset lists them, read through read_mixture."""
    kept, index = Counter(), 0
    for _ in range(passes):
        for folder, copies in zip(folders, repeats):
            for f in sorted((folder / "shards").glob("*.parquet")) * copies:
                table = read_mixture({"path": pa.array([str(f)]), "index": pa.array([index])}, rules, seed=0)
                kept.update(table["task"].to_pylist())
                index += 1
    return kept


def test_task_weights_scale_a_task_within_its_source(tmp_path):
    train = _shard_set(tmp_path / "train", {"t2i": 200, "caption": 200, "vqa": 400})
    source = DataSource("train", 1.0, ("t2i", "caption", "vqa"), task_weights={"t2i": 3.0})
    rules, repeats, epoch_rows = mixture_rules([source], [train])
    assert repeats == [3]  # t2i rows are drawn 3x: the files are listed 3 times
    kept = _read(rules, repeats, [train], passes=20)
    total = sum(kept.values())
    assert abs(kept["t2i"] / total - 600 / 1200) < 0.02  # weight 3 x 200 of 3 x 200 + 600
    assert abs(kept["vqa"] / kept["caption"] - 2.0) < 0.15
    assert abs(total / 20 - epoch_rows) / epoch_rows < 0.05  # an epoch is the source's size


def test_sources_keep_their_shares_and_only_their_tasks(tmp_path):
    train = _shard_set(tmp_path / "train", {"t2i": 300, "caption": 300, "asr": 300})
    sdvi = _shard_set(tmp_path / "sdvi", {"svqa": 100, "s2i": 50})
    mixture = [DataSource("train", 0.5, ("t2i", "caption")), DataSource("sdvi", 0.5, task_weights={"s2i": 2.0})]
    rules, repeats, _ = mixture_rules(mixture, [train, sdvi])
    kept = _read(rules, repeats, [train, sdvi], passes=20)
    total = sum(kept.values())
    assert kept["asr"] == 0
    assert abs((kept["svqa"] + kept["s2i"]) / total - 0.5) < 0.02
    assert abs(kept["s2i"] / kept["svqa"] - 1.0) < 0.1  # 50 rows at weight 2 vs 100 at 1


def test_one_source_per_shard_set_and_no_negative_weights(tmp_path):
    train = _shard_set(tmp_path / "train", {"t2i": 10, "caption": 10})
    with pytest.raises(ValueError, match="listed twice"):
        mixture_rules([DataSource("train", 1.0, ("t2i",)), DataSource("train", 1.0, ("caption",))],
                      [train, train])
    with pytest.raises(ValueError, match=">= 0"):
        DataSource("train", 1.0, task_weights={"t2i": -1.0})


def test_task_weights_load_from_yaml_style_config():
    cfg = from_dict(DataConfig, {"mixture": [{"shards": "train", "weight": 1,
                                              "tasks": ["t2i", "vqa"], "task_weights": {"t2i": 2}}]})
    assert cfg.mixture[0].task_weights == {"t2i": 2} and cfg.mixture[0].tasks == ("t2i", "vqa")
