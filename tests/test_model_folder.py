"""The model folder's files read back, and names inside its own files (the weight index, a
checkpoint's file list) that point outside it are refused, whoever reads them."""

import json

import pytest
import torch

from omni_model import model_folder
from omni_model.tokenizers.sensevoice import read_prefixed
from pipelines.train.checkpoint import TRAIN_STATE, checkpoint_complete


def _sharded(folder, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """A folder whose index maps each tensor name to the shard file `names` gives."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: torch.full((2,), float(i)) for i, key in enumerate(names)}
    for key, shard in names.items():
        (folder / shard).parent.mkdir(parents=True, exist_ok=True)
        model_folder.write_weights(folder, {key: state[key]}, shard)
    (folder / model_folder.WEIGHTS_INDEX_FILE).write_text(json.dumps({"weight_map": names}))
    return state


def test_sharded_weights_read_back_whole_or_by_prefix(tmp_path):
    state = _sharded(tmp_path / "m", {"audio.w": "a.safetensors", "llm.w": "b.safetensors"})
    got = model_folder.read_weights(tmp_path / "m")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert model_folder.weight_files(tmp_path / "m", ["audio."]) == [tmp_path / "m" / "a.safetensors"]
    assert read_prefixed(tmp_path / "m", ["audio."]).keys() == {"audio.w"}
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        model_folder.read_weights(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "x/../../o.safetensors"])
def test_a_weight_shard_named_outside_the_folder_is_refused(tmp_path, shard):
    folder = tmp_path / "m"
    folder.mkdir()
    model_folder.write_weights(tmp_path, {"audio.w": torch.zeros(2)}, "outside.safetensors")
    (folder / model_folder.WEIGHTS_INDEX_FILE).write_text(json.dumps({"weight_map": {"audio.w": shard}}))
    with pytest.raises(ValueError, match="is not a path inside"):
        model_folder.read_weights(folder)
    with pytest.raises(ValueError, match="is not a path inside"):
        read_prefixed(folder, ["audio."])  # the release's speech input reads shards its own way


def test_a_hugging_face_snapshot_whose_shards_are_links_loads(tmp_path):
    """The hub cache links each shard of snapshots/<rev>/ to ../../blobs/<hash>: allowed,
    since the name in the index stays inside the folder."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    model_folder.write_weights(blobs, {"llm.w": torch.ones(3)}, "9f2e")
    (snapshot / "model-1.safetensors").symlink_to("../../blobs/9f2e")
    (snapshot / model_folder.WEIGHTS_INDEX_FILE).write_text(json.dumps({"weight_map": {"llm.w": "model-1.safetensors"}}))
    assert torch.equal(model_folder.read_weights(snapshot)["llm.w"], torch.ones(3))


def test_a_checkpoint_listing_a_file_outside_itself_is_not_complete(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"1234")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "inside.bin").write_bytes(b"1234")
    (ckpt / TRAIN_STATE).write_text(json.dumps({"world": 1, "files": {"inside.bin": 4}}))
    (ckpt / "rank_0.pt").write_bytes(b"")
    assert checkpoint_complete(ckpt)
    (ckpt / TRAIN_STATE).write_text(json.dumps({"world": 1, "files": {"inside.bin": 4, "../outside.bin": 4}}))
    assert not checkpoint_complete(ckpt)
