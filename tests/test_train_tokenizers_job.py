"""jobs/train_tokenizers.py end to end on a small folder of real media: PIL-drawn images,
espeak-ng speech with transcripts, text; the offline recogniser scores decoded speech."""

import json
import subprocess
from collections import Counter
from dataclasses import replace

import pytest
import yaml
from PIL import Image, ImageDraw

from jobs.build_sdvi import BuildSDVIJob
from jobs.build_world import BuildWorldJob
from jobs.train_tokenizers import main
from omni_model.config import load_config, to_dict
from omni_model.tokenizers.codec import SpeechCodec
from omni_model.tokenizers.image import MagVitTokenizer
from omni_model.tokenizers.text import BPETokenizer
from pipelines.tokenizers.config import DataConfig, TokenizersConfig
from pipelines.tokenizers.data import decoder_clips, voice_clips
from pipelines.tokenizers.shipped import WORLD_SETTINGS, shipped_differences, training_settings
from tests.conftest import ROOT

SENTENCES = ["a red circle on the left", "two blue squares", "a green triangle at the top",
             "three yellow circles", "is the square red", "a purple square on the right"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    for i in range(12):
        img = Image.new("RGB", (48, 40), "white")
        ImageDraw.Draw(img).ellipse([4 + i, 6, 20 + i, 22], fill=(40 * i % 255, 80, 200))
        img.save(root / f"scene_{i}.png")
    (root / "broken.png").write_bytes(b"not a png")  # skipped with a warning
    for i, text in enumerate(SENTENCES):
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(root / f"utt_{i}.wav"), text],
                       check=True)
        (root / f"utt_{i}.txt").write_text(text + "\n")
    (root / "captions.txt").write_text("\n".join(SENTENCES * 5) + "\n")
    answers = root.parent / "answers"  # more speech, without transcripts (SDVI's spoken answers)
    answers.mkdir()
    for word in ("yes", "one"):
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(answers / f"{word}.wav"), word], check=True)
    # The voice the model speaks in: TTS targets and a spoken answer (the question's clip,
    # in the user turn, is not the model's voice). Paths are relative to root.parent.
    rows = [{"messages": [{"role": "user", "content": f"Say this out loud.\n{SENTENCES[i]}"},
                          {"role": "assistant", "content": "<|audio|>"}],
             "audios": [f"{root.name}/utt_{i}.wav"]} for i in (1, 3, 4)]
    rows.append({"messages": [{"role": "user", "content": "<|image|><|audio|>"},
                              {"role": "assistant", "content": "yes<|audio|>"}],
                 "images": [f"{root.name}/scene_0.png"], "audios": [f"{root.name}/utt_0.wav", "answers/yes.wav"]})
    rows.append({"messages": [{"role": "user", "content": "x"}]})  # invalid: left out, logged
    (root.parent / "voice.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_job_trains_saves_and_reports(media, tmp_path, capsys):
    out = tmp_path / "tok"
    settings = ["--config", "configs/tiny/tokenizers.yaml", f"data.dir={media}",
                "data.holdout=0.2", "text.vocab_size=300", "image.train.steps=4",
                "image.train.batch_size=4", "speech.train.steps=4", "speech.train.batch_size=2",
                "speech.examples=1", f"data.audio_dirs=[{media.parent / 'answers'}]",
                "speech.decoder.steps=4", "speech.decoder.batch_size=2",
                f"data.voice_root={media.parent}", f"data.voice_manifests=[{media.parent / 'voice.jsonl'}]"]
    world = {"world": {"image_size": 48, "group_share": 0.3, "speed_range": [0.9, 1.1],
                       "caption_voices": [{"engine": "espeak", "voice": "en-us", "weight": 1.0}]}}
    (media.parent / "config.yaml").write_text(yaml.safe_dump(world))  # as a built world records it
    rc = main([*settings, f"out_dir={out}"])
    assert rc == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["text"]["tokens_per_line"] > 0
    assert report["image"]["codes_per_image"] == 64 and report["image"]["psnr_db"] > 0
    assert report["image"]["train_images"] + report["image"]["held_out_images"] == 12
    speech = report["speech"]
    assert 23 < speech["codes_per_second"] < 28  # 50 Hz frames pooled by 2 (configs/tiny)
    assert speech["wer_original"] < 0.5  # the recogniser understands espeak-ng
    assert speech["wer_decoded"] >= 0  # four steps of training: scored, not good
    assert speech["train_utterances"] + speech["held_out_utterances"] == 8  # 6 + 2 answers
    assert 1 <= speech["wer_utterances"] <= speech["held_out_utterances"]  # only the transcribed
    # the decoder is fitted to the training clips of the voice: utt_1, utt_3 and yes.wav
    # (utt_4, in the voice too, is held out by the seeded split and scored on its own)
    assert speech["decoder_utterances"] == 3 < speech["train_utterances"]
    assert speech["voice_wer_utterances"] == 1 and speech["voice_wer_original"] < 0.5
    printed = capsys.readouterr().out
    assert "held-out PSNR" in printed and "tokenizers trained" in printed
    # everything loads back through the tokenizers' own loaders
    assert BPETokenizer.from_pretrained(out / "text").vocab_size <= 300
    assert MagVitTokenizer.from_pretrained(out / "image").fingerprint == report["image"]["fingerprint"]
    assert SpeechCodec.from_pretrained(out / "speech").fingerprint == speech["fingerprint"]
    assert (out / "image_reconstructions.png").exists()
    assert (out / "speech_example_0_decoded.wav").exists()
    assert (out / "config.yaml").exists()

    # trained again on the same settings: the folder's tokenizers are used, not retrained
    assert main([*settings, f"out_dir={tmp_path / 'again'}", f"shipped={out}"]) == 0
    assert "tokenizers: the shipped ones" in capsys.readouterr().out
    assert json.loads((tmp_path / "again" / "quality.json").read_text()) == report
    assert MagVitTokenizer.from_pretrained(tmp_path / "again" / "image").fingerprint == report["image"]["fingerprint"]
    # another tokenizer setting or another world: they are not what would be trained, and why
    cfg = load_config(TokenizersConfig, "configs/tiny/tokenizers.yaml", [*settings[2:], f"shipped={out}"])
    assert shipped_differences(cfg, out) == []
    assert shipped_differences(replace(cfg, seed=1), out) == ["seed: 0 here 1"]
    world["world"]["image_size"] = 64
    (media.parent / "config.yaml").write_text(yaml.safe_dump(world))
    assert shipped_differences(cfg, out) == ["world.image_size: 48 here 64"]
    (media.parent / "config.yaml").unlink()
    assert "not a built world" in shipped_differences(cfg, out)[0]


def test_job_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        main([f"data.dir={tmp_path / 'nope'}", f"out_dir={tmp_path / 'o'}"])
    with pytest.raises(FileNotFoundError, match="audio folder"):
        main([f"data.dir={tmp_path}", f"data.audio_dirs=[{tmp_path / 'nope'}]", f"out_dir={tmp_path / 'o'}"])


def test_decoder_voice_must_be_among_the_training_clips(media, tmp_path):
    """A voice manifest none of whose spoken outputs is trained on is an error, as is one
    without the root its paths are relative to."""
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"messages": [{"role": "user", "content": "Say it."},
                                              {"role": "assistant", "content": "<|audio|>"}],
                                 "audios": ["elsewhere/a.wav"]}) + "\n")
    args = ["--config", "configs/tiny/tokenizers.yaml", f"data.dir={media}", f"out_dir={tmp_path / 'o'}",
            "image.train.steps=1", "speech.train.steps=1", "speech.decoder.steps=1", "speech.asr=false",
            f"data.voice_manifests=[{other}]", "data.audio_dirs=[]", "data.voice_root="]
    with pytest.raises(ValueError, match="voice_root"):
        main(args)
    with pytest.raises(ValueError, match="no training clip is a spoken output"):
        main([*args, f"data.voice_root={tmp_path}"])


def test_voice_clips_count_the_rows_that_say_them(media, tmp_path):
    """`data.voice_draw: rows` weighs a clip by the voice manifests' rows that say it (a
    spoken answer repeated across questions counts each time); a user turn's audio is not
    the model's voice."""
    manifest = media.parent / "voice.jsonl"
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text(manifest.read_text() + manifest.read_text().splitlines()[3] + "\n")
    data = DataConfig(voice_manifests=(str(repeated),), voice_root=str(media.parent), voice_draw="rows")
    counts = voice_clips(data)
    root = media.parent.resolve()
    assert counts == {root / "answers/yes.wav": 2, **{root / f"{media.name}/utt_{i}.wav": 1 for i in (1, 3, 4)}}
    with pytest.raises(ValueError, match="voice_draw"):
        voice_clips(replace(data, voice_draw="often"))


def test_decoder_clips_and_their_draws(tmp_path):
    """The decoder fits the training clips in the voice and the held-out clips said by more
    than one row (an answer the model says again and again; a caption said once stays held
    out for the report), each drawn as `voice_draw` says; without voice manifests, every
    training clip, drawn equally."""
    a, b, c, d, e = (tmp_path.resolve() / f"{n}.wav" for n in "abcde")
    voice = Counter({a: 9, b: 1, d: 4, e: 1})  # c: a training clip the model never says
    train, held = [a, b, c], [d, e]
    assert decoder_clips(train, held, voice, "clips") == ([0, 1], [0], None)
    assert decoder_clips(train, held, voice, "rows") == ([0, 1], [0], [9.0, 1.0, 4.0])
    assert decoder_clips(train, held, voice, "sqrt") == ([0, 1], [0], [3.0, 1.0, 2.0])
    assert decoder_clips(train, held, None, "sqrt") == ([0, 1, 2], [], None)


def test_the_shipped_tokenizers_match_the_quickstarts_settings():
    """pretrained/tokenizers is what the quickstart's tokenizer step would train on the
    full profile's world (configs/tiny/world.yaml, sdvi.yaml, tokenizers.yaml): a change to
    any of those settings makes the quickstart retrain instead of using stale ones."""
    shipped = json.loads((ROOT / "pretrained/tokenizers/trained_on.json").read_text())
    world = load_config(BuildWorldJob, ROOT / "configs/tiny/world.yaml", []).world
    sdvi = load_config(BuildSDVIJob, ROOT / "configs/tiny/sdvi.yaml", []).sdvi
    recorded = {"world": to_dict(world), "sdvi": to_dict(sdvi)}
    for name, keys in WORLD_SETTINGS.items():
        for key in keys:
            assert shipped[f"{name}.{key}"] == recorded[name][key], f"{name}.{key}"
    cfg = load_config(TokenizersConfig, ROOT / "configs/tiny/tokenizers.yaml", [])
    wanted = {k: v for k, v in training_settings(cfg).items() if not k.startswith(("world.", "sdvi."))}
    assert {k: shipped[k] for k in wanted} == wanted
    quality = json.loads((ROOT / "pretrained/tokenizers/quality.json").read_text())
    for part in ("text", "image", "speech"):
        assert quality[part]["fingerprint"]
