"""The released model behind the any-to-any API (`ReleaseAnyToAny`), the public
evaluation sets' manifests, and the evaluation of a release folder, on the tiny release
folder the official code wrote (tests/fixtures/omni_release/tiny_a), with real speech
(espeak-ng), real image files and the tiny MAGVIT-v2 fixture."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from omni_model.any_to_any import AnyToAny, Audio, RequestError
from omni_model.release.any_to_any import ReleaseAnyToAny, task_for
from omni_model.release.response import parse_response
from omni_model.release.sampler import preset
from pipelines.evaluation.public_sets import write_set
from pipelines.evaluation.run import EvalConfig, evaluate
from tests.conftest import FIXTURES
from tests.speech_decoder import wide_decoder

RELEASE = FIXTURES / "omni_release" / "tiny_a"
MAGVIT = FIXTURES / "magvit_tiny_a"
SIDE = 32  # the tiny MAGVIT's resolution


def speech(text: str, path: Path | None = None) -> tuple[np.ndarray, int]:
    """Real speech from espeak-ng (written to `path` as well when given)."""
    out = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True).stdout
    # espeak-ng's --stdout header has a bogus size: read the samples after the 44-byte header
    wave = np.frombuffer(out[44:], dtype="<i2").astype(np.float32) / 32768.0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave, 22050)
    return wave, 22050


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipe() -> ReleaseAnyToAny:
    loaded = AnyToAny.from_pretrained(RELEASE, image_tokenizer=MAGVIT)
    loaded.image_resolution = SIDE
    return loaded


@pytest.fixture(scope="module")
def clip():
    return speech("open the window please")


def test_one_loader_recognises_either_format(pipe):
    assert isinstance(pipe, ReleaseAnyToAny)
    with pytest.raises(ValueError, match="speech_tokenizer"):
        AnyToAny.from_pretrained(RELEASE, speech_tokenizer=FIXTURES / "glm4voice_tiny_a")
    with pytest.raises(ValueError, match="own text tokenizer"):
        AnyToAny.from_pretrained(RELEASE, text_tokenizer="anything")


def test_speech_answers_are_spoken_by_glm4voice_decoder(tmp_path, clip):
    """With GLM-4-Voice's decoder folder (given, or found inside the release folder as
    glm-4-voice-decoder/), speech answers come as 22,050 Hz waveforms: the decoder's
    rendering of the codes, a batch's answers decoded together as each alone."""
    decoder = wide_decoder()
    speaking = AnyToAny.from_pretrained(RELEASE, speech_decoder=decoder)
    requests = [speaking.prepare(["hello there"], ["speech"], {"speech": 20}),
                speaking.prepare(["see you"], ["speech"], {"speech": 40}),
                speaking.prepare([Audio(*clip)], ["text", "speech"])]
    outs = speaking.generate_batch(requests, seeds=[1, 2, 3])
    for out in outs:
        if out.speech_codes:
            assert out.sample_rate == 22_050 and out.speech.dtype == np.float32
            alone = speaking.speech_decoder.decode([torch.tensor(out.speech_codes)])[0].numpy()
            assert out.speech.shape == alone.shape and np.abs(out.speech - alone).max() < 1e-5
        else:
            assert out.speech is not None and len(out.speech) == 0
    assert outs[0].speech_codes and len(outs[0].speech) == 256 * speaking.speech_decoder.flow.frames_for(
        len(outs[0].speech_codes))
    longest = max((o.speech_codes for o in outs), key=len)
    chunks = list(speaking.stream_speech(longest, blocks=(10,)))
    assert len(chunks) == -(-len(longest) // 10)
    # each chunk's frames are rounded on their own (the original's arithmetic): about the
    # one-pass length, within a frame a chunk
    assert abs(sum(map(len, chunks)) - 256 * speaking.speech_decoder.flow.frames_for(len(longest))) <= 256 * len(chunks)
    # codes only without a decoder; a folder beside the release's files is found
    assert AnyToAny.from_pretrained(RELEASE).generate(["hello there"], ["speech"], seed=1).speech is None
    folder = tmp_path / "release"
    shutil.copytree(RELEASE, folder)  # copies: the loader refuses shards that link outside
    shutil.copytree(decoder, folder / "glm-4-voice-decoder")
    assert AnyToAny.from_pretrained(folder).speech_decoder is not None
    with pytest.raises(ValueError, match="knows 300 codes"):
        AnyToAny.from_pretrained(RELEASE, speech_decoder=FIXTURES / "glm4voice_decoder")


def test_requests_map_to_the_release_tasks(pipe, clip):
    audio = Audio(*clip)
    assert pipe.prepare(["a red house"], ["image"]).task == "t2i"
    assert pipe.prepare([audio], ["image"]).task == "s2i"
    assert pipe.prepare([picture(), "what is it?"], ["text"]).task == "vqa"
    assert pipe.prepare([audio], ["text"]).task == "asr"
    assert pipe.prepare(["hello there"], ["speech"]).task == "tts"
    assert pipe.prepare([audio, picture()], ["text", "speech"]).task == "svqa"
    assert pipe.prepare([audio], ["speech", "text"]).task == "sqa"
    with pytest.raises(RequestError, match="no task for outputs"):
        pipe.prepare(["just chat"], ["text"])
    with pytest.raises(RequestError, match="takes no text"):
        pipe.prepare(["transcribe this", audio], ["text"])
    with pytest.raises(RequestError, match="at most one image"):
        pipe.prepare([picture(0), picture(1), "which?"], ["text"])
    with pytest.raises(RequestError, match="empty audio"):
        pipe.prepare([Audio(np.zeros(0, np.float32), 16000)], ["text"])
    with pytest.raises(RequestError, match="needs a text input"):
        pipe.prepare([picture()], ["text"])
    with pytest.raises(RequestError, match="no task"):
        task_for(["text", "image", "speech"], True, True)


def test_the_pipe_answers_as_the_model_runs_the_official_inference(pipe, clip):
    """Each task through the any-to-any API gives what `ReleaseModel.run` gives (the
    official prompt, preset and parsing; run itself is checked against the official
    code's ids in test_release.py), with the same seed."""
    model, magvit = pipe.model, pipe.image_tokenizer
    image = picture(3)
    cases = {"t2i": (["a red house"], ["image"], dict(text="a red house")),
             "vqa": ([image, "what is it?"], ["text"], dict(text="what is it?", image=image)),
             "asr": ([Audio(*clip)], ["text"], dict(audio=clip)),
             "tts": (["hello there"], ["speech"], dict(text="hello there")),
             "s2i": ([Audio(*clip)], ["image"], dict(audio=clip)),
             "svqa": ([Audio(*clip), image], ["text", "speech"], dict(audio=clip, image=image))}
    small = {"max_new_tokens": 24, "steps": 12}
    for task, (inputs, outputs, kwargs) in cases.items():
        prepared = pipe.prepare(inputs, outputs)
        settings = replace(prepared.config, **small)
        assert settings == preset(task, **small)
        out = pipe.generate_batch([prepared], small, seeds=[7])[0]
        if "audio" in kwargs:  # run() draws the features' dither unseeded: give generate the pipe's features
            ids = model.generate(prepared.prompt, settings, prepared.features,
                                 model.unconditional(settings, prepared.prompt, 7), torch.Generator().manual_seed(7))
            expected = parse_response(ids, model.tokenizer, model.vocab)
        else:
            expected = model.run(task, image_tokenizer=magvit, image_resolution=SIDE, config=settings, seed=7, **kwargs)
        if "text" in outputs:
            assert out.text == expected.text.strip(), task
        if "speech" in outputs:
            assert out.speech_codes == expected.speech_codes, task
        if "image" in outputs:
            assert out.image_codes == expected.image_codes and out.image is not None, task
        assert out.prompt_tokens == len(prepared.prompt.ids) and out.tokens == 24 and 1 <= out.steps <= 12


def test_features_of_a_clip_do_not_depend_on_the_request(pipe, clip):
    a = pipe.prepare([Audio(*clip)], ["text"]).features[0]
    b = pipe.prepare([Audio(*clip)], ["image"]).features[0]
    assert torch.equal(a, b)


def test_a_batch_answers_each_request_as_alone(pipe, clip):
    requests = [pipe.prepare(["hello there"], ["speech"]), pipe.prepare([Audio(*clip)], ["text"]),
                pipe.prepare(["good morning"], ["speech"])]
    options = {"temperature": 0.8, "max_new_tokens": 16, "steps": 8}
    together = pipe.generate_batch(requests, options, seeds=[1, 2, 3])
    alone = [pipe.generate_batch([r], options, seeds=[s])[0] for r, s in zip(requests, [1, 2, 3])]
    assert [o.speech_codes for o in together] == [o.speech_codes for o in alone]
    assert [o.text for o in together] == [o.text for o in alone]
    other_seed = pipe.generate_batch(requests[:1], options, seeds=[99])[0]
    assert other_seed.speech_codes != together[0].speech_codes  # temperature 0.8: the seed matters


def test_lengths_size_the_response_and_settings_are_checked(pipe, clip):
    prepared = pipe.prepare(["hello there"], ["speech"], {"speech": 30})
    assert prepared.config.max_new_tokens == 30
    assert prepared.config.steps == 15  # tts: half as many steps as positions, as the preset has it
    spoken = pipe.prepare([Audio(*clip)], ["text", "speech"], {"spoken": 40})
    assert (spoken.config.max_new_tokens, spoken.config.steps, spoken.config.add_boa_token) == (40, 40, True)
    with pytest.raises(ValueError, match="unknown official sampler option"):
        pipe.settings(prepared, {"cache": "prefix"})
    with pytest.raises(ValueError, match="alg"):
        pipe.settings(prepared, {"alg": "nonsense"})


def test_on_step_stops_a_call(pipe):
    prepared = pipe.prepare(["hello there"], ["speech"])
    seen = []

    def stop_at_three(n: int) -> None:
        seen.append(n)
        if n == 3:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        pipe.generate_batch([prepared], {"max_new_tokens": 20, "steps": 10}, on_step=stop_at_three)
    assert seen == [0, 1, 2, 3]


# ---------------------------------------------------------------------- public sets
def public_sets(root: Path) -> dict[str, Path]:
    """Tiny copies of LibriSpeech, LibriTTS, MME (both layouts) and POPE, laid out as
    their downloads are, with real speech and image files."""
    texts = ["turn on the light", "the cat sat down"]
    for i, text in enumerate(texts):
        chapter = root / "LibriSpeech" / "test-clean" / "19" / "198"
        wave, rate = speech(text)
        chapter.mkdir(parents=True, exist_ok=True)
        sf.write(chapter / f"19-198-000{i}.flac", wave, rate)
        with open(chapter / "19-198.trans.txt", "a") as f:
            f.write(f"19-198-000{i} {text.upper()}\n")
        tts = root / "LibriTTS" / "test-clean" / "84" / "121"
        speech(text, tts / f"84_121_000{i}.wav")
        (tts / f"84_121_000{i}.normalized.txt").write_text(text.capitalize() + ".")
    (root / "LibriSpeech" / "test-clean" / "19" / "198" / "19-198.trans.txt").open("a").write(
        "19-198-0009 NO AUDIO FOR THIS ONE\n")
    side_by_side = root / "MME" / "color"
    side_by_side.mkdir(parents=True)
    picture(1).save(side_by_side / "0001.png")
    (side_by_side / "0001.txt").write_text("Is there a red object? Please answer yes or no.\tYes\n"
                                           "Is there a green object? Please answer yes or no.\tNo\n")
    split = root / "MME" / "landmark"
    (split / "images").mkdir(parents=True)
    (split / "questions_answers_YN").mkdir()
    picture(2).save(split / "images" / "tower.jpg")
    (split / "questions_answers_YN" / "tower.txt").write_text("Is this a tower? Please answer yes or no.\tYes\n"
                                                              "Is this a bridge? Please answer yes or no.\tNo\n")
    coco = root / "coco" / "val2014"
    coco.mkdir(parents=True)
    picture(4).save(coco / "COCO_val2014_000000000042.jpg")
    pope = root / "POPE" / "coco_pope_random.json"
    pope.parent.mkdir()
    pope.write_text("".join(json.dumps({"question_id": q, "image": "COCO_val2014_000000000042.jpg",
                                        "text": f"Is there a {thing} in the image?", "label": label}) + "\n"
                            for q, (thing, label) in enumerate([("dog", "yes"), ("car", "no")], 1)))
    return {"librispeech": root / "LibriSpeech" / "test-clean", "libritts": root / "LibriTTS" / "test-clean",
            "mme": root / "MME", "pope": pope, "coco": coco}


def test_public_sets_become_manifests(tmp_path):
    sets = public_sets(tmp_path / "data")
    out = tmp_path / "manifests"
    root = tmp_path / "data"
    assert write_set("librispeech", sets["librispeech"], out / "librispeech.jsonl", root) == 2  # the row without audio left out
    assert write_set("libritts", sets["libritts"], out / "libritts.jsonl", root) == 2
    assert write_set("mme", sets["mme"], out / "mme.jsonl", root) == 4
    assert write_set("pope", sets["pope"], out / "pope.jsonl", root, images=sets["coco"]) == 2
    asr = [json.loads(line) for line in (out / "librispeech.jsonl").read_text().splitlines()]
    assert asr[0]["task"] == "asr" and asr[0]["messages"][1]["content"] == "TURN ON THE LIGHT"
    assert asr[0]["audios"] == ["LibriSpeech/test-clean/19/198/19-198-0000.flac"]
    mme = [json.loads(line) for line in (out / "mme.jsonl").read_text().splitlines()]
    assert {r["meta"]["image_id"] for r in mme} == {"color/0001", "landmark/tower"}
    assert [r["messages"][1]["content"] for r in mme] == ["Yes", "No", "Yes", "No"]
    with pytest.raises(ValueError, match="not inside the data root"):
        write_set("libritts", sets["libritts"], out / "x.jsonl", tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="COCO images"):
        write_set("pope", sets["pope"], out / "x.jsonl", root)


@pytest.mark.slow
def test_evaluate_a_release_folder_on_public_sets(tmp_path):
    """jobs/evaluate.py's driver on a release folder: LibriSpeech ASR, LibriTTS TTS,
    MME and POPE yes/no through the official evaluation settings, TTS spoken by the
    GLM-4-Voice decoder and heard by Whisper, with a broken row quarantined (random weights: the scores are noise; what is checked is that every
    set runs, is scored by its metric and uses the official settings)."""
    root = tmp_path / "data"
    sets = public_sets(root)
    manifests = tmp_path / "manifests"
    for name in ("librispeech", "libritts", "mme"):
        write_set(name, sets[name], manifests / f"{name}.jsonl", root)
    write_set("pope", sets["pope"], manifests / "pope.jsonl", root, images=sets["coco"])
    with open(manifests / "mme.jsonl", "a") as f:
        f.write('{"task": "vqa", "messages": [{"role": "user", "content": "<|image|>\\nIs it?"}, '
                '{"role": "assistant", "content": "Yes"}], "images": ["../outside.png"]}\n')
    cfg = EvalConfig(model=str(RELEASE), image_tokenizer=str(MAGVIT), speech_tokenizer=None, data_root=str(root),
                     speech_decoder=str(wide_decoder()), wavs=1,
                     manifests=tuple(str(manifests / f"{n}.jsonl") for n in ("librispeech", "libritts", "mme", "pope")),
                     out=str(tmp_path / "report"), tasks=("asr", "tts", "vqa"), max_per_task=16, calibrate_from=(),
                     runs=(), step_curve=(), release_image_resolution=SIDE, grid=0,
                     release_sampler={"tts": {"max_new_tokens": 12, "steps": 6}})
    metrics = evaluate(cfg)
    tasks = metrics["tasks"]
    assert tasks["asr"]["n"] == 2 and "wer" in tasks["asr"]
    # spoken by GLM-4-Voice's decoder and heard by Whisper: intelligibility, and a 22,050 Hz WAV
    assert tasks["tts"]["n"] == 2 and 0 <= tasks["tts"]["intelligibility_wer"]
    wav = next((tmp_path / "report").rglob("tts_0.wav"))
    assert sf.info(wav).samplerate == 22_050
    assert tasks["vqa"]["n"] == 6 and {"yes_no_accuracy", "yes_no_accuracy_plus", "yes_no_f1"} <= set(tasks["vqa"])
    settings = metrics["release_settings"]
    assert settings["vqa"]["max_new_tokens"] == 8 and settings["vqa"]["steps"] == 8  # the MME script's
    assert settings["asr"]["alg"] == "entropy" and settings["asr"]["steps"] == max(1, settings["asr"]["max_new_tokens"] // 2)
    assert settings["tts"]["max_new_tokens"] == 12 and settings["tts"]["alg"] == "entropy-penalty"
    # a row of a file read for every task is quarantined once (under the first task read)
    assert sum(metrics["quarantined"].values()) == 1
    assert "escapes the data root" in (tmp_path / "report" / "quarantine.jsonl").read_text()
    assert (tmp_path / "report" / "report.md").exists()
    assert not (tmp_path / "report" / "presets.json").exists()  # the project's length presets do not apply


def test_the_documented_six_task_example_runs():
    """docs/release.md's `python -c` example, as a user pastes it, on the fixture release."""
    import re
    import sys

    text = (FIXTURES.parent.parent / "docs" / "release.md").read_text()
    script = re.search(r'\.venv/bin/python -c "\n(.*?)\n"\n```', text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", script], cwd=FIXTURES.parent.parent, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["t2i", "vqa", "asr", "tts", "s2i", "svqa"]
    assert lines[0].endswith("True") and lines[3].split()[-2] != "0"  # an image from t2i, speech codes from tts
