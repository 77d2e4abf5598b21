"""Manifest parsing and validation: every bad row gets a clear reason."""

import json

import pytest

from pipelines.data.manifest import ManifestError, Sample, infer_task, parse_line, read_lines, write_manifest


def _row(**kw):
    row = {"messages": [{"role": "user", "content": "<|image|>\nWhat is it?"},
                        {"role": "assistant", "content": "a cat"}], "images": ["a.png"]}
    row.update(kw)
    return json.dumps(row)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    return tmp_path


def test_a_good_row(root):
    s = parse_line(_row(), root)
    assert s.task == "vqa" and s.images == ["a.png"]


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (_row(messages=[]), "non-empty list"),
    (_row(messages=[{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]), "unknown role"),
    (_row(messages=[{"role": "user", "content": "<|image|>"}]), "last message"),
    (_row(images=[]), "1 <|image|> placeholders but 0 images"),
    (_row(images=["a.png", "a.png"]), "but 2 images"),
    (_row(images=["../../etc/passwd"]), "escapes the data root"),
    (_row(images=["/etc/passwd"]), "absolute"),
    (_row(images=["missing.png"]), "missing file"),
    (_row(task="dance"), "unknown task"),
])
def test_bad_rows_are_rejected_with_a_reason(root, line, reason):
    with pytest.raises(ManifestError, match=reason.replace("|", r"\|").replace("(", r"\(")):
        parse_line(line, root)


def test_task_inference():
    m = lambda u, a: [{"role": "user", "content": u}, {"role": "assistant", "content": a}]  # noqa: E731
    assert infer_task(m("Draw a cat", "<|image|>")) == "t2i"
    assert infer_task(m("<|audio|>", "<|image|>")) == "s2i"
    assert infer_task(m("<|image|><|audio|>", "red<|audio|>")) == "svqa"
    assert infer_task(m("Say hi", "<|audio|>")) == "tts"
    assert infer_task(m("<|audio|>", "hi")) == "asr"
    assert infer_task(m("<|image|>Describe.", "a cat")) == "caption"
    assert infer_task(m("hi", "hello")) == "text"


def test_write_and_read_round_trip(tmp_path, root):
    samples = [parse_line(_row(), root), Sample([{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "é"}], task="text")]
    path = tmp_path / "m" / "x.jsonl"
    assert write_manifest(path, samples) == 2
    lines = list(read_lines(path))
    assert [n for n, _ in lines] == [1, 2]
    assert parse_line(lines[1][1], check_files=False).messages[1]["content"] == "é"


def test_spoken_outputs_are_the_assistants_audio():
    """Spoken VQA: the question clip is the user's, the answer clip the assistant's."""
    s = Sample([{"role": "user", "content": "<|image|><|audio|>"},
                {"role": "assistant", "content": "yes<|audio|>"}], ["i.png"], ["q.wav", "a.wav"])
    assert s.spoken_outputs() == ["a.wav"]
    tts = Sample([{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "<|audio|>"}],
                 [], ["t.wav"])
    assert tts.spoken_outputs() == ["t.wav"]
    asr = Sample([{"role": "user", "content": "<|audio|>"}, {"role": "assistant", "content": "hi"}], [], ["u.wav"])
    assert asr.spoken_outputs() == []


@pytest.mark.parametrize("meta, reason", [
    ('{"x": NaN}', "NaN is not a JSON number"),
    ('{"x": -Infinity}', "-Infinity is not a JSON number"),
    ('{"x": 1e999}', "number 1e999 is not finite"),
    ('{"x": 9223372036854775808}', "integer 9223372036854775808 is outside"),
    ('{"x": ' + "7" * 5000 + "}", "integer of 5000 digits is outside"),
])
def test_every_number_a_row_carries_is_bounded(root, meta, reason):
    """Python's parser takes NaN, Infinity and integers of any length (up to 4,300
    digits, then a bare ValueError); a row's numbers are refused past 64 bits or not finite."""
    line = _row()[:-1] + ', "meta": ' + meta + "}"
    with pytest.raises(ManifestError, match=reason):
        parse_line(line, root)
    assert parse_line(_row()[:-1] + ', "id": 9223372036854775807, "meta": {"x": 1.5}}', root).id == "9223372036854775807"
