"""The tokenizers the project ships (pretrained/tokenizers) against a freshly built world:
they must read it as well as their quality.json says, so that a change to the world (its
rendering, its voices) cannot leave them stale unnoticed. Real world build (Ray Data,
the real TTS voices of configs/tiny/world.yaml) and the offline Whisper."""

import json
from dataclasses import replace

import pytest

from jobs.build_world import BuildWorldJob
from omni_model.config import load_config
from pipelines.evaluation.asr import WhisperRecognizer
from pipelines.tokenizers.quality import quality_on_world
from pipelines.world.build import build_world
from tests.conftest import ROOT

SHIPPED = ROOT / "pretrained" / "tokenizers"


@pytest.mark.slow
def test_shipped_tokenizers_read_a_fresh_world_as_their_quality_report_says(ray_session, tmp_path):
    world = load_config(BuildWorldJob, ROOT / "configs/tiny/world.yaml", []).world
    # another seed: scenes and sentences the tokenizers never saw, from the same world
    build_world(replace(world, out=str(tmp_path / "world"), seed=7, train_scenes=2, eval_scenes=40, tts_workers=1))
    recorded = json.loads((SHIPPED / "quality.json").read_text())
    measured = quality_on_world(SHIPPED, tmp_path / "world", WhisperRecognizer().transcribe, images=40, clips=20)
    image, speech = measured["image"], measured["speech"]
    assert image["checker_images"] >= 35
    # 40 images and 20 clips against the report's 120 and 25: margins for the smaller samples
    assert image["checker_overall"] >= recorded["image"]["checker_overall"] - 0.10, image
    assert speech["voice_wer_utterances"] == 20
    assert speech["voice_wer_original"] <= 0.2, speech  # the world's own speech is clear
    assert speech["voice_wer_decoded"] <= recorded["speech"]["voice_wer_decoded"] + 0.15, speech
