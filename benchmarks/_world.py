"""A small world tokenized with the fixture tokenizers: shards for the training benchmarks."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def make_shards(root: Path, scenes: int = 150, tts_workers: int = 2) -> Path:
    """Build a `scenes`-scene world under `root/world` and its shard set `root/shards/train`;
    returns `root/shards`."""
    from pipelines.data.tokenize import TokenizeConfig, tokenize_manifest
    from pipelines.world.build import Voice, WorldConfig, build_world

    build_world(WorldConfig(out=str(root / "world"), train_scenes=scenes, eval_scenes=1, tts_workers=tts_workers,
                            caption_voices=(Voice("espeak", "en-us"),)))
    tokenize_manifest(TokenizeConfig(manifest=str(root / "world/manifests/train/all.jsonl"),
                                     data_root=str(root / "world"), out=str(root / "shards/train"),
                                     image_tokenizer=str(FIXTURES / "magvit_tiny_a"),
                                     speech_tokenizer=str(FIXTURES / "glm4voice_tiny_a")))
    return root / "shards"
