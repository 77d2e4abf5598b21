"""The evaluator: its scores are perfect on ground truth and near chance on random
outputs; the whole evaluation runs on a real held-out world (Ray Data build, espeak
speech) through the any-to-any API and writes its report folder."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from omni_model.any_to_any import LengthPresets
from omni_model.sampler import SamplerConfig
from omni_model.tokenizers.image import MagVitTokenizer
from omni_model.tokenizers.text import ByteTokenizer
from omni_model.tokenizers.train_speech import small_codec
from omni_model.toy import toy_model
from omni_model.vocab import Vocab
from pipelines.evaluation import (EVAL_TASKS, Case, EvalConfig, Prediction, evaluate, exact_match, format_report,
                                  load_cases, prior_guess, says, score_images)
from pipelines.world.build import Voice, WorldConfig, build_world
from pipelines.world.scenes import ANSWERS, captions, make_scene, questions, render
from pipelines.world.sdvi import SDVIConfig, build_sdvi
from tests.conftest import ROOT
from tests.step_clock import step

IMAGE_TOKENIZER = ROOT / "tests/assets/world_magvit32"


def test_image_scores_are_perfect_on_real_renders_and_near_zero_on_noise():
    scenes = [make_scene(7, i) for i in range(60)]
    truth = score_images(scenes, [render(s, 32) for s in scenes])
    assert all(v == 1.0 for v in truth.values())
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in scenes]
    assert score_images(scenes, noise)["overall"] <= 0.05


def test_answer_scores_are_perfect_on_references_and_near_chance_on_guesses():
    rng = random.Random(0)
    answers = [a for i in range(200) for _, a in questions(make_scene(3, i), rng)]
    assert exact_match(answers, answers) == 1.0
    assert exact_match(answers, [a.upper() + "." for a in answers]) == 1.0  # normalised
    guesses = [rng.choice(ANSWERS) for _ in answers]
    assert exact_match(answers, guesses) < 3 / len(ANSWERS)
    # a caption is right in any of the world's wordings of its scene, and only in those
    scenes = [make_scene(3, i) for i in range(100)]
    wordings = [captions(s) for s in scenes]
    assert exact_match(wordings, [rng.choice(w) for w in wordings]) == 1.0
    assert exact_match(wordings, [w[0] for w in wordings[1:] + wordings[:1]]) < 0.1
    assert says(["two blue squares"], ["I see two blue squares."]) == 1.0
    assert says(["two blue squares"], ["two red squares"]) == 0.0
    assert says(["one", "three"], ["1.", "It's 3"]) == 1.0  # recognisers write small numbers as digits
    assert says(["one"], ["11"]) == 0.0


@pytest.fixture(scope="module")
def held_out(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_world")
    with step("build the held-out world and its SDVI"):
        build_world(WorldConfig(out=str(root), train_scenes=2, eval_scenes=6, tts_workers=1,
                                caption_voices=(Voice("espeak", "en-us"),)))
        build_sdvi(SDVIConfig(vqa_manifests=(str(root / "manifests/eval/vqa.jsonl"),),
                              caption_manifests=(str(root / "manifests/eval/caption.jsonl"),),
                              data_root=str(root), out=str(root / "manifests/sdvi_eval"), max_rows=4,
                              question_voices=(Voice("espeak", "en-us+m3"),),
                              answer_voices=(Voice("espeak", "en-us+f3"),), tts_workers=1))
    return root


def test_held_out_cases_load_with_their_media(held_out):
    cfg = EvalConfig(data_root=str(held_out), manifests=(str(held_out / "manifests/eval"),
                                                         str(held_out / "manifests/sdvi_eval")))
    t2i = load_cases(cfg, "t2i")
    assert len(t2i) == 6 and all(isinstance(c.inputs[0], str) and c.scene for c in t2i)
    svqa = load_cases(cfg, "svqa")
    assert [type(x).__name__ for x in svqa[0].inputs] == ["Image", "Audio"]
    assert svqa[0].reference in ANSWERS
    assert all(c.answer_audio is not None and c.answer_audio.seconds > 0.2 for c in svqa)
    assert all(c.answer_audio is None for c in t2i)
    tts = load_cases(cfg, "tts")
    assert tts[0].reference and "\n" not in tts[0].reference


def test_the_prior_guess_answers_each_case_with_another_cases_output(held_out):
    cfg = EvalConfig(data_root=str(held_out), manifests=(str(held_out / "manifests/eval"),))
    t2i, caption = load_cases(cfg, "t2i"), load_cases(cfg, "caption")
    prior = prior_guess("t2i", t2i)
    assert set(prior) >= {"colour", "shape", "overall"}
    assert prior["overall"] < 1.0  # real renders, but of other scenes
    assert score_images([c.scene for c in t2i], [render(c.scene) for c in t2i])["overall"] == 1.0
    assert prior_guess("caption", caption)["exact_match"] < 1.0
    assert 0 < prior_guess("asr", load_cases(cfg, "asr"))["wer"] <= 1.5
    assert prior_guess("tts", load_cases(cfg, "tts")) == {}  # needs a recogniser: not guessed
    assert prior_guess("t2i", t2i, seed=1) != {} and prior_guess("t2i", t2i[:1]) == {}


def test_an_untrained_model_scores_near_chance_and_the_report_is_written(held_out, tmp_path):
    text = ByteTokenizer()
    image_tok = MagVitTokenizer.from_pretrained(IMAGE_TOKENIZER)
    codec = small_codec(codebook_size=64, d_model=64, layers=2, seed=0)
    codec.save_pretrained(tmp_path / "codec")
    vocab = Vocab.fresh(text.vocab_size, image_tok.codebook_size, codec.codebook_size)
    model_dir = tmp_path / "model"
    toy_model(vocab, hidden=64, layers=2, seed=0).save_pretrained(model_dir)
    vocab.save(model_dir)
    run = tmp_path / "stage1"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in (1, 2, 3)))

    class Recognizer:  # stands in for Whisper, which this test does not need to load
        def transcribe(self, wave, rate):
            return "nothing"

    cfg = EvalConfig(model=str(model_dir), image_tokenizer=str(IMAGE_TOKENIZER),
                     speech_tokenizer=str(tmp_path / "codec"), data_root=str(held_out),
                     manifests=(str(held_out / "manifests/eval"), str(held_out / "manifests/sdvi_eval")),
                     out=str(tmp_path / "report"), max_per_task=4, sampler=SamplerConfig(steps=4),
                     image_sampler=SamplerConfig(steps=4, confidence="random"),
                     presets=LengthPresets(text=8, spoken=16, speech_min=8, speech_max=16, asr_min=4),
                     step_curve=(2, 4), runs=(str(run),), wavs=1, calibrate_from=(),
                     task_sampler={"svqa": {"cache": "prefix", "cache_refresh": 2}})
    metrics = evaluate(cfg, recognizer_factory=Recognizer)
    tasks = metrics["tasks"]
    assert set(tasks) == {"t2i", "s2i", "caption", "vqa", "asr", "tts", "svqa"}
    assert tasks["t2i"]["overall"] <= 0.25 and tasks["vqa"]["exact_match"] <= 0.25
    assert tasks["asr"]["wer"] >= 0.75 and tasks["tts"]["intelligibility_wer"] == 1.0
    assert tasks["svqa"]["reference_through_codec_says_it"] == 0.0  # the stand-in hears "nothing"
    assert tasks["svqa"]["reference_says_it"] == 0.0
    assert [(r["steps"], r["position_penalty"]) for r in metrics["t2i_steps"]] == [(2, 1.0), (2, 2.0),
                                                                                   (4, 1.0), (4, 2.0)]
    report = tmp_path / "report"
    assert json.loads((report / "metrics.json").read_text())["tasks"]["vqa"]["n"] == 4
    # presets.json records the lengths and the sampler options the report was measured with
    presets = LengthPresets.from_dict(json.loads((report / "presets.json").read_text()))
    assert presets.text == 8 and presets.sampler == {"spoken": {"cache": "prefix", "cache_refresh": 2}}
    assert "| vqa | 4 | exact_match |" in (report / "report.md").read_text()
    assert set(metrics["prior_guess"]["t2i"]) >= {"colour", "overall"}
    assert "prior guess" in format_report(metrics)
    assert Image.open(report / "t2i_grid.png").size[0] > 0 and Image.open(report / "loss.png").size == (640, 360)
    assert Image.open(report / "t2i_steps.png").size == (640, 360)
    assert list(report.glob("tts_*.wav")) and list(report.glob("svqa_*.wav"))
    assert format_report(metrics).startswith("# Evaluation")


def test_tasks_are_a_table_and_an_unknown_task_is_refused_by_name():
    assert set(EVAL_TASKS) == {"t2i", "s2i", "caption", "vqa", "asr", "tts", "svqa"}
    assert EVAL_TASKS["svqa"].outputs == ("text", "speech") and EVAL_TASKS["svqa"].speaks
    assert not EVAL_TASKS["vqa"].speaks
    with pytest.raises(ValueError, match="no evaluation task 'mme'.*known"):
        EvalConfig(tasks=("vqa", "mme"))
    # sampler options per task, over the image sampler where the task draws images
    from pipelines.evaluation.run import sampler_for

    cfg = EvalConfig(image_sampler=SamplerConfig(steps=32), task_sampler={"svqa": {"cache": "prefix"},
                                                                           "t2i": {"threshold": 0.9}})
    assert sampler_for(cfg, "svqa").cache == "prefix" and sampler_for(cfg, "vqa").cache == "none"
    assert sampler_for(cfg, "t2i").threshold == 0.9 and sampler_for(cfg, "t2i").steps == 32
    for bad in ({"svqa": {"cahce": "prefix"}}, {"vqa": {"cache": "all"}}, {"mme": {}}):
        with pytest.raises(ValueError):
            EvalConfig(task_sampler=bad)
    # presets.json records per kind of output the options all its evaluated tasks share
    from pipelines.evaluation.run import recorded_sampler

    fast = {"threshold": 0.9, "early_stop": True}
    cfg = EvalConfig(task_sampler={"vqa": fast, "caption": fast, "asr": {**fast, "threshold": 0.8},
                                   "svqa": {"cache": "prefix"}})
    assert recorded_sampler(cfg) == {"text": {"early_stop": True}, "spoken": {"cache": "prefix"}}
    assert recorded_sampler(replace(cfg, tasks=("vqa", "t2i"))) == {"text": fast}
    with pytest.raises(ValueError, match="presets.sampler: unknown output kind 'spoke'"):
        LengthPresets(sampler={"spoke": {}})
    with pytest.raises(ValueError, match="presets.sampler.text.*cahce"):
        LengthPresets(sampler={"text": {"cahce": "prefix"}})
    # the same scorer reads the model's answers and the prior guess's
    cases = [Case("svqa", [], "three"), Case("svqa", [], "red")]
    heard = EVAL_TASKS["svqa"].score(cases, [Prediction("three", heard="I see three"), Prediction("blue", heard="")])
    assert heard == {"exact_match": 0.5, "spoken_answer_says_it": 0.5}
    assert EVAL_TASKS["svqa"].score(cases, [Prediction("three"), Prediction("red")]) == {"exact_match": 1.0}
    assert prior_guess("svqa", cases) == {"exact_match": 0.0, "spoken_answer_says_it": 0.0}
    # a yes/no VQA set (POPE, MME) gets their scores; the image groups MME's two questions
    pope = [Case("vqa", [], "yes", group="p"), Case("vqa", [], "no", group="p")]
    scores = EVAL_TASKS["vqa"].score(pope, [Prediction("Yes"), Prediction("yes")])
    assert scores["yes_no_f1"] == pytest.approx(2 / 3) and scores["yes_no_accuracy_plus"] == 0.0
    assert "yes_no_f1" not in EVAL_TASKS["vqa"].score(cases[:1], [Prediction("three")])


def test_presets_are_calibrated_from_training_shards(tmp_path):
    from pipelines.data.shards import write_shard
    from pipelines.evaluation import calibrate_presets

    def row(task, user, answer):
        return {"sample_id": f"{task}{len(user)}", "task": task, "source": "m", "line": 0, "meta": "{}",
                "messages": [{"role": "user", "parts": user}, {"role": "assistant", "parts": answer}]}

    text = lambda t: {"type": "text", "text": t, "codes": None, "grid": None, "frame_rate": None}
    speech = lambda n: {"type": "speech", "text": None, "codes": list(range(n)), "grid": None,
                        "frame_rate": 12.5}
    rows = [row("tts", [text("Say: abcd")], [speech(34)]),  # 9 bytes -> (34 + 2) / 9 = 4 per token
            row("asr", [speech(25)], [text("abcdefg")]),  # 2 s -> (7 + 1) / 2 = 4 tokens per second
            row("vqa", [text("q")], [text("three")]),
            row("svqa", [text("q")], [text("two"), speech(10)])]  # 3 + 1 + 10 + 2 = 16, boa at 3/16
    write_shard(rows, tmp_path / "shards" / "part-0.parquet", {"format_version": 1})
    presets = calibrate_presets([str(tmp_path)], ByteTokenizer(), quantile=0.5)
    assert presets.tts_codes_per_token == 4.0 and presets.asr_tokens_per_second == 4.0
    assert presets.text == 7 and presets.spoken == 16 and presets.boa_fraction == round(3 / 16, 3)


def _users_set(root):
    """A user's own evaluation set in the published format: one manifest file of mixed
    tasks, their images (no world scene recorded) and real neural speech (hibari)."""
    import soundfile as sf

    from pipelines.world.tts import get_engine

    (root / "media").mkdir(parents=True)
    for i in range(3):
        render(make_scene(11, i), 32).save(root / "media" / f"photo{i}.png")
    tts = get_engine("hibari")
    spoken = ["the quick brown fox", "three red circles", "good morning"]
    for i, text in enumerate(spoken):
        sf.write(root / "media" / f"clip{i}.wav", tts.synthesize(text), 16000)
    humans = [["2"] * 4 + ["two"] * 2 + ["3"] * 4, ["red"] * 10, ["yes"] * 2 + ["no"] * 8]
    rows = []
    for i in range(3):
        image = [f"media/photo{i}.png"]
        rows += [
            {"task": "vqa", "messages": [{"role": "user", "content": "<|image|>how many?"},
                                         {"role": "assistant", "content": humans[i][0]}],
             "images": image, "audios": [], "meta": {"answers": humans[i]}},
            {"task": "caption", "messages": [{"role": "user", "content": "<|image|>Describe it."},
                                             {"role": "assistant", "content": f"caption {i}"}],
             "images": image, "audios": [], "meta": {"captions": [f"a photo of thing {i} on a table", f"thing {i} pictured on a table"]}},
            {"task": "t2i", "messages": [{"role": "user", "content": f"Draw thing {i}."},
                                         {"role": "assistant", "content": "<|image|>"}],
             "images": image, "audios": []},
            {"task": "asr", "messages": [{"role": "user", "content": "Transcribe.<|audio|>"},
                                         {"role": "assistant", "content": spoken[i].capitalize() + "."}],
             "images": [], "audios": [f"media/clip{i}.wav"]},
            {"task": "tts", "messages": [{"role": "user", "content": f"Say this.\n{spoken[i]}"},
                                         {"role": "assistant", "content": "<|audio|>"}],
             "images": [], "audios": [f"media/clip{i}.wav"]},
        ]
    path = root / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_users_manifest_of_any_tasks_is_scored_with_the_fields_metrics(tmp_path):
    manifest = _users_set(tmp_path / "set")
    cfg = EvalConfig(data_root=str(tmp_path / "set"), manifests=(str(manifest),), max_per_task=8)
    vqa, caption, t2i = (load_cases(cfg, t) for t in ("vqa", "caption", "t2i"))
    assert len(vqa) == 3 and vqa[0].references[:4] == ["2"] * 4 and load_cases(cfg, "svqa") == []
    # the scorers read the manifest's own references: VQA v2 accuracy over ten humans
    # (the first question: "two" matches 6 of 10), every reference caption
    answers = [Prediction(text) for text in ("two", "red", "maybe")]
    assert EVAL_TASKS["vqa"].score(vqa, answers)["vqa_accuracy"] == pytest.approx((1 + 1 + 0) / 3)
    assert EVAL_TASKS["vqa"].score(vqa, answers)["exact_match"] == pytest.approx(2 / 3)  # the rows' own answers
    right = EVAL_TASKS["caption"].score(caption, [Prediction(f"Thing {i} pictured on a table.") for i in range(3)])
    assert right["exact_match"] == 1.0 and right["bleu4"] == pytest.approx(1.0) and right["cider"] > 1
    assert EVAL_TASKS["t2i"].score(t2i, [Prediction(image=render(make_scene(0, 0)))] * 3) == {"unscored": 3.0}
    # the whole evaluation on it, with an untrained model: only the manifest's tasks,
    # the field's metrics in the report
    text, image_tok = ByteTokenizer(), MagVitTokenizer.from_pretrained(IMAGE_TOKENIZER)
    codec = small_codec(codebook_size=64, d_model=64, layers=2, seed=0)
    codec.save_pretrained(tmp_path / "codec")
    vocab = Vocab.fresh(text.vocab_size, image_tok.codebook_size, codec.codebook_size)
    toy_model(vocab, hidden=64, layers=2, seed=0).save_pretrained(tmp_path / "model")
    vocab.save(tmp_path / "model")

    class Recognizer:  # stands in for Whisper, which this test does not need to load
        def transcribe(self, wave, rate):
            return "the quick brown dog"

    # a bad row is quarantined with where it is, and the rest are still evaluated
    manifest.write_text(manifest.read_text() + json.dumps(
        {"task": "vqa", "messages": [{"role": "user", "content": "<|image|>q"}, {"role": "assistant", "content": "a"}],
         "images": ["media/photo0.png"], "audios": [], "meta": {"answers": "red"}}) + "\n")
    quarantine = []
    assert len(load_cases(replace(cfg, max_per_task=99), "vqa", quarantine)) == 3
    assert [(q["source"], q["line"]) for q in quarantine] == [(str(manifest), 16)]
    assert "meta.answers must be a non-empty list" in quarantine[0]["reason"]
    metrics = evaluate(replace(cfg, model=str(tmp_path / "model"), image_tokenizer=str(IMAGE_TOKENIZER),
                               speech_tokenizer=str(tmp_path / "codec"), out=str(tmp_path / "report"),
                               sampler=SamplerConfig(steps=4), calibrate_from=(), runs=(),
                               presets=LengthPresets(text=8, speech_min=8, speech_max=16, asr_min=4)),
                       recognizer_factory=Recognizer)
    tasks = metrics["tasks"]
    assert set(tasks) == {"t2i", "caption", "vqa", "asr", "tts"}
    assert {"bleu4", "cider", "exact_match"} <= set(tasks["caption"]) and "vqa_accuracy" in tasks["vqa"]
    assert {"wer", "cer"} <= set(tasks["asr"]) and tasks["t2i"]["unscored"] == 3 and "overall" not in tasks["t2i"]
    assert {"intelligibility_wer", "intelligibility_cer"} <= set(tasks["tts"])
    assert "t2i_steps" not in metrics  # no scenes: no checker curve
    assert metrics["quarantined"] == {"vqa": 1} and tasks["vqa"]["n"] == 3
    written = [json.loads(line) for line in (tmp_path / "report" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["task"]) for q in written] == [(16, "vqa")]
    report = (tmp_path / "report" / "report.md").read_text()
    assert str(manifest) in report and "| caption | 3 | cider |" in report and "| vqa | 3 | vqa_accuracy |" in report
    assert "Quarantined (not evaluated; `quarantine.jsonl` says why): vqa 1." in report
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*nope.jsonl"):
        load_cases(replace(cfg, manifests=(str(tmp_path / "nope.jsonl"),)), "vqa")


def test_one_bad_case_is_quarantined_and_audio_is_read_within_its_limit(tmp_path):
    """Measured before: the evaluation read audio of any length, and one bad row (here
    a scene that is not one, a clip over the limit, a FIFO, a line that is not JSON)
    stopped it. Now each is quarantined with its file, line and reason; the rest load."""
    import os

    from pipelines.data.media import MediaLimits
    from tests.hostile import wav_bytes

    root = tmp_path / "set"
    (root / "media").mkdir(parents=True)
    (root / "media" / "short.wav").write_bytes(wav_bytes(1.0))
    (root / "media" / "long.wav").write_bytes(wav_bytes(3.0))
    os.mkfifo(root / "media" / "fifo.wav")
    render(make_scene(11, 0), 32).save(root / "media" / "photo.png")
    asr = lambda clip: {"task": "asr", "messages": [{"role": "user", "content": "Transcribe.<|audio|>"},  # noqa: E731
                                                    {"role": "assistant", "content": "hum"}], "audios": [clip]}
    t2i = lambda meta: {"task": "t2i", "messages": [{"role": "user", "content": "Draw it."},  # noqa: E731
                                                    {"role": "assistant", "content": "<|image|>"}],
                        "images": ["media/photo.png"], "meta": meta}
    lines = [json.dumps(asr("media/short.wav")), json.dumps(asr("media/long.wav")), "{not json",
             json.dumps(asr("media/fifo.wav")), json.dumps(t2i({"scene": {"objects": [{"colour": 5}]}})),
             json.dumps(t2i({"scene": {"things": []}})), json.dumps(t2i({})),
             json.dumps(asr("media/short.wav"))]
    manifest = root / "mine.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    cfg = EvalConfig(data_root=str(root), manifests=(str(manifest),), limits=MediaLimits(max_audio_seconds=2.0))
    quarantine = []
    assert len(load_cases(cfg, "asr", quarantine)) == 2
    assert len(load_cases(cfg, "t2i", quarantine)) == 1
    reasons = {}
    for q in quarantine:
        assert q["source"] == str(manifest)
        reasons.setdefault(q["line"], q["reason"])
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert "audio: audio of 3.0s exceeds 2s" in reasons[2]
    assert "not valid JSON" in reasons[3]
    assert "not a regular file" in reasons[4]
    assert "TypeError" in reasons[5] and "KeyError" in reasons[6]
