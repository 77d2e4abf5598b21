"""Hugging Face datasets in (jobs/import_hf.py): local datasets in each layout a user has
(`save_to_disk`, Parquet, imagefolder, audiofolder), built here with real images and
real neural speech (hibari), become media and a manifest in the published format; bad
rows go to quarantine with their reason; the manifest tokenizes through the Ray Data job
and loads as evaluation cases. Nothing comes from a hub."""

import io
import os
import json

import datasets
import numpy as np
import pytest
import soundfile as sf

from jobs.import_hf import main as import_main
from pipelines.data.hf_import import ImportConfig, import_dataset
from pipelines.data.manifest import parse_line, read_lines
from pipelines.data.media import load_audio, load_image
from pipelines.evaluation import EvalConfig, load_cases
from pipelines.world.scenes import make_scene, render
from pipelines.world.tts import get_engine

SENTENCES = ["the quick brown fox", "three red circles", "good morning to you"]


def _wav(text: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, get_engine("hibari").synthesize(text), 16000, format="WAV")
    return buffer.getvalue()


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    render(make_scene(9, i), 32).save(buffer, format="PNG")
    return buffer.getvalue()


def _manifest(out, task):
    return [parse_line(line, out) for _, line in read_lines(out / f"{task}.jsonl")]


def _quarantine(out):
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def asr_on_disk(tmp_path_factory):
    """A saved DatasetDict (train/test) with an Audio feature: speech, a corrupt clip, an
    empty transcript."""
    root = tmp_path_factory.mktemp("asr_disk")
    audio = [{"bytes": _wav(t), "path": f"{i}.wav"} for i, t in enumerate(SENTENCES)]
    audio.append({"bytes": b"RIFF\x00\x00\x00\x00WAVEjunk", "path": "bad.wav"})
    text = [t.capitalize() + "." for t in SENTENCES] + ["a clip that cannot be read"]
    audio.append({"bytes": _wav("hello"), "path": "empty.wav"})
    text.append("   ")
    test = datasets.Dataset.from_dict({"audio": audio, "transcription": text}).cast_column("audio", datasets.Audio())
    train = test.select([0])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "ds"))
    return root / "ds"


def test_a_saved_dataset_becomes_media_and_a_manifest_with_bad_rows_quarantined(asr_on_disk, tmp_path):
    out = tmp_path / "asr"
    summary = import_dataset(ImportConfig(str(asr_on_disk), "asr", str(out), {"text": "transcription"}))
    assert summary["rows"] == 5 and summary["written"] == 3 and summary["quarantined"] == 2  # the test split
    rows = _manifest(out, "asr")
    assert [r.messages[-1]["content"] for r in rows] == [t.capitalize() + "." for t in SENTENCES]
    assert rows[0].messages[0]["content"] == "Transcribe the audio.\n<|audio|>" and rows[0].task == "asr"
    wave, rate = load_audio(out / rows[0].audios[0])
    assert rate == 16000 and len(wave) > 8000
    reasons = {q["index"]: q["reason"] for q in _quarantine(out)}
    assert "MediaError" in reasons[3] and "empty" in reasons[4]
    # the evaluation reads the imported folder as it is
    cases = load_cases(EvalConfig(data_root=str(out), manifests=(str(out),)), "asr")
    assert len(cases) == 3 and cases[1].reference == "Three red circles." and type(cases[1].inputs[1]).__name__ == "Audio"
    # a split that is not there, or a column that is not, is refused by name
    with pytest.raises(ValueError, match=r"no split 'dev'; the dataset has \['train', 'test'\]"):
        import_dataset(ImportConfig(str(asr_on_disk), "asr", str(tmp_path / "x"), {"text": "transcription"}, "dev"))
    with pytest.raises(ValueError, match=r"no column \['text'\] for asr.*transcription"):
        import_dataset(ImportConfig(str(asr_on_disk), "asr", str(tmp_path / "x")))


def test_imagefolder_captions_and_t2i_and_a_corrupt_image(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    meta = []
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(i))
        meta.append({"file_name": f"{i}.png", "text": f"scene {i}", "captions": [f"scene {i}", f"picture {i}"]})
    (folder / "broken.png").write_bytes(_png(0)[:60])
    meta.append({"file_name": "broken.png", "text": "broken", "captions": ["broken"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    out = tmp_path / "cap"
    assert import_dataset(ImportConfig(str(folder), "caption", str(out), {"text": "captions"}))["quarantined"] == 1
    rows = _manifest(out, "caption")
    assert len(rows) == 3 and {r.messages[-1]["content"] for r in rows} == {"scene 0", "scene 1", "scene 2"}
    assert all(r.meta["captions"][1].startswith("picture") for r in rows)
    assert load_image(out / rows[0].images[0]).size == (32, 32)
    assert "MediaError" in _quarantine(out)[0]["reason"]
    t2i = tmp_path / "t2i"
    import_dataset(ImportConfig(str(folder), "t2i", str(t2i)))
    rows = _manifest(t2i, "t2i")
    assert rows[0].messages[0]["content"].startswith("Generate an image of scene") and rows[0].images


def test_an_audiofolder_for_tts_refuses_paths_outside_it(tmp_path):
    folder = tmp_path / "voices"
    (folder / "clips").mkdir(parents=True)
    for i, text in enumerate(SENTENCES):
        (folder / "clips" / f"{i}.wav").write_bytes(_wav(text))
    (tmp_path / "outside.wav").write_bytes(_wav("secret"))
    lines = ["file_name,sentence"] + [f"clips/{i}.wav,{t}" for i, t in enumerate(SENTENCES)] + ["../outside.wav,secret"]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "tts"
    summary = import_dataset(ImportConfig(str(folder), "tts", str(out), {"text": "sentence"}))
    assert summary["written"] == 3 and summary["quarantined"] == 1
    assert "outside the dataset folder" in _quarantine(out)[0]["reason"]
    rows = _manifest(out, "tts")
    assert rows[2].messages[0]["content"] == "Say this out loud.\ngood morning to you"
    assert rows[2].messages[-1]["content"] == "<|audio|>" and len(rows[2].audios) == 1


def test_parquet_vqa_with_human_answers_only(tmp_path):
    answers = [[{"answer": a, "answer_confidence": "yes"} for a in ["2"] * 6 + ["3"] * 4],
               [{"answer": a, "answer_confidence": "yes"} for a in ["red"] * 10]]
    data = datasets.Dataset.from_dict({
        "image": [{"bytes": _png(i), "path": None} for i in range(2)],
        "question": ["How many shapes?", "What colour?"], "answers": answers,
    }).cast_column("image", datasets.Image())
    (tmp_path / "vqa" / "data").mkdir(parents=True)
    data.to_parquet(str(tmp_path / "vqa" / "data" / "test-00000.parquet"))
    out = tmp_path / "out"
    import_dataset(ImportConfig(str(tmp_path / "vqa"), "vqa", str(out)))
    rows = _manifest(out, "vqa")
    assert [r.messages[-1]["content"] for r in rows] == ["2", "red"]  # the most common human answer
    assert rows[0].meta["answers"] == ["2"] * 6 + ["3"] * 4
    assert rows[0].messages[0]["content"] == "<|image|>\nHow many shapes?"
    cases = load_cases(EvalConfig(data_root=str(out), manifests=(str(out / "vqa.jsonl"),)), "vqa")
    assert cases[0].references[-1] == "3"


def test_the_command_line(asr_on_disk, tmp_path, capsys):
    assert import_main(["--dataset", str(asr_on_disk), "--task", "asr", "--out", str(tmp_path / "o"),
                        "--columns", "text=transcription", "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 2
    assert import_main(["--dataset", str(asr_on_disk), "--task", "asr", "--out", str(tmp_path / "capped"),
                        "--columns", "text=transcription", "--max-file-bytes", "1000"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 0
    assert "over the limit of 1000 bytes" in _quarantine(tmp_path / "capped")[0]["reason"]
    assert import_main(["--dataset", str(tmp_path / "none"), "--task", "asr", "--out", str(tmp_path / "o")]) == 2
    assert "no dataset folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        import_main(["--dataset", str(asr_on_disk), "--task", "asr", "--out", "o", "--columns", "speech=audio"])
    assert "asr has no role ['speech']" in capsys.readouterr().err


def test_an_imported_manifest_tokenizes_through_the_ray_data_job(ray_session, asr_on_disk, fixtures_dir, tmp_path):
    from pipelines.data.shards import read_shards
    from pipelines.data.tokenize import TokenizeConfig, tokenize_manifest

    out = tmp_path / "asr"
    import_dataset(ImportConfig(str(asr_on_disk), "asr", str(out), {"text": "transcription"}))
    summary = tokenize_manifest(TokenizeConfig(manifest=str(out / "asr.jsonl"), data_root=str(out),
                                               out=str(tmp_path / "shards"), image_tokenizer=None,
                                               speech_tokenizer=str(fixtures_dir / "glm4voice_tiny_a"),
                                               rows_per_part=8, batch_size=4))
    assert summary["totals"] == {"rows": 3, "shard_rows": 3, "quarantined": 0}
    table = read_shards(tmp_path / "shards").to_pylist()
    speech = [p for r in table for m in r["messages"] for p in m["parts"] if p["type"] == "speech"]
    assert len(speech) == 3 and all(len(p["codes"]) > 10 for p in speech)
    # codes at the tokenizer's rate: a clip's code count follows its length
    seconds = [len(load_audio(out / r.audios[0])[0]) / 16000 for r in _manifest(out, "asr")]
    rates = [len(p["codes"]) / s for p, s in zip(sorted(speech, key=lambda p: len(p["codes"])), sorted(seconds))]
    assert np.allclose(rates, speech[0]["frame_rate"], rtol=0.15)


# ---------------------------------------------------------------------- hostile datasets
def _written_values(out):
    """The level of every clip the import wrote (the good clips hold 0.1, the secret 0.3)."""
    return sorted({round(float(np.abs(load_audio(p)[0]).max()), 2) for p in (out / "media").glob("*.wav")})


def test_no_field_or_type_in_an_audiofolder_reads_outside_it_and_every_bad_row_is_quarantined(tmp_path):
    """The issue's audiofolder: `"audio": {"bytes": "/a/file.wav"}` was read from that path
    into media/; `"file_name": 5` stopped the import with a TypeError; a FIFO hung it."""
    from tests.hostile import wav_bytes

    folder = tmp_path / "voices"
    (folder / "clips").mkdir(parents=True)
    for name in ("0.wav", "1.wav", "2.wav"):
        (folder / "clips" / name).write_bytes(wav_bytes(0.5, value=0.1))
    (folder / "clips" / "big.wav").write_bytes(wav_bytes(4.0, value=0.1))  # 128 KB: over the cap below
    os.mkfifo(folder / "clips" / "fifo.wav")  # opened for reading, a FIFO blocks until a writer comes
    secret = tmp_path / "secret.wav"
    secret.write_bytes(wav_bytes(0.5, value=0.3))
    (folder / "clips" / "link.wav").symlink_to(secret)
    lines = [
        {"file_name": "clips/0.wav", "sentence": "good zero"},
        {"file_name": "clips/1.wav", "sentence": "bytes as a path", "audio": {"bytes": str(secret)}},
        {"file_name": 5, "sentence": "a number"},
        {"file_name": ["clips/1.wav"], "sentence": "a list"},
        {"file_name": {"path": str(secret)}, "sentence": "an object"},
        {"file_name": str(secret), "sentence": "absolute"},
        {"file_name": "../secret.wav", "sentence": "up and out"},
        {"file_name": "clips/link.wav", "sentence": "a symlink out"},
        {"file_name": "clips/fifo.wav", "sentence": "a fifo"},
        {"file_name": "clips/big.wav", "sentence": "too big"},
        {"file_name": "clips/2.wav", "sentence": 7},
        {"file_name": "clips/1.wav", "sentence": "good one"},
    ]
    text = [json.dumps(x) for x in lines]
    text.insert(2, "{not json")
    text.insert(3, '{"file_name": "clips/2.wav", "sentence": "huge", "n": ' + "9" * 5000 + "}")
    (folder / "metadata.jsonl").write_text("\n".join(text) + "\n")
    out = tmp_path / "tts"
    summary = import_dataset(ImportConfig(str(folder), "tts", str(out), {"text": "sentence"},
                                          max_file_bytes=100_000))
    assert summary["written"] == 2 and summary["quarantined"] == 12
    rows = _manifest(out, "tts")
    assert [r.messages[0]["content"].splitlines()[1] for r in rows] == ["good zero", "good one"]
    assert _written_values(out) == [0.1]  # nothing of the secret clip was copied in
    reasons = {q["line"]: q["reason"] for q in _quarantine(out)}
    assert all(q["file"] == "metadata.jsonl" for q in _quarantine(out))
    expected = {
        2: "an 'audio' column beside file_name",  # its "bytes", a path, never followed
        3: "not valid JSON",
        4: "integer",  # 5,000 digits
        5: "file_name must be a non-empty string, not int",
        6: "file_name must be a non-empty string, not list",
        7: "file_name must be a non-empty string, not dict",
        8: "outside the dataset folder",
        9: "outside the dataset folder",
        10: "outside the dataset folder",
        11: "not a regular file",
        12: "over the limit of 100000 bytes",
        13: "the text is empty or not text",
    }
    for line, reason in expected.items():
        assert reason in reasons[line], (line, reasons[line])


def test_a_mapped_media_column_is_checked_whatever_type_carries_the_path(tmp_path):
    """A column mapped to a role may hold a dict, a string, nested lists or bytes: paths
    in any of them resolve inside the dataset folder or the row is quarantined; bytes
    given as bytes are used as bytes."""
    from tests.hostile import wav_bytes

    folder = tmp_path / "voices"
    (folder / "clips").mkdir(parents=True)
    (folder / "clips" / "0.wav").write_bytes(wav_bytes(0.5, value=0.1))
    secret = tmp_path / "secret.wav"
    secret.write_bytes(wav_bytes(0.5, value=0.3))
    inline = list(wav_bytes(0.5, value=0.1))  # JSON cannot hold bytes: a list of ints is not bytes either
    voices = [
        {"path": "clips/0.wav"},  # good
        "clips/0.wav",  # good: a plain string path
        {"bytes": str(secret), "path": "clips/0.wav"},
        {"bytes": None, "path": "../secret.wav"},
        {"path": str(secret)},
        {"path": ["clips/0.wav"]},
        [[str(secret)]],
        {"bytes": inline},
        5,
        None,
    ]
    lines = [json.dumps({"file_name": "clips/0.wav", "sentence": f"row {i}", "voice": v})
             for i, v in enumerate(voices)]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "tts"
    summary = import_dataset(ImportConfig(str(folder), "tts", str(out), {"text": "sentence", "audio": "voice"}))
    assert summary["written"] == 2 and summary["quarantined"] == 8
    assert _written_values(out) == [0.1]
    reasons = [q["reason"] for q in _quarantine(out)]
    for reason, expected in zip(reasons, ["is text, not bytes", "outside the dataset folder",
                                          "outside the dataset folder", "path must be a non-empty string",
                                          "media must be", "bytes must be bytes", "media must be",
                                          "no media"]):
        assert expected in reason, (expected, reason)


def test_a_parquet_struct_whose_bytes_is_a_string_is_not_read_as_a_path(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "set" / "data").mkdir(parents=True)
    (tmp_path / "set" / "pictures").mkdir()
    (tmp_path / "set" / "pictures" / "0.png").write_bytes(_png(0))
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(1))
    kind = pa.struct([("bytes", pa.string()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": None, "path": "pictures/0.png"}, {"bytes": str(outside), "path": None},
                           {"bytes": "../outside.png", "path": None}, {"bytes": None, "path": str(outside)}],
                          type=kind),
        "text": ["inside", "absolute bytes", "relative bytes", "absolute path"]})
    pq.write_table(table, tmp_path / "set" / "data" / "test-00000.parquet")
    out = tmp_path / "t2i"
    summary = import_dataset(ImportConfig(str(tmp_path / "set"), "t2i", str(out)))
    assert summary["written"] == 1 and summary["quarantined"] == 3
    assert [p.read_bytes() == outside.read_bytes() for p in (out / "media").iterdir()] == [False]
    assert [q["index"] for q in _quarantine(out)] == [1, 2, 3]
    assert all("not bytes" in q["reason"] for q in _quarantine(out)[:2])
