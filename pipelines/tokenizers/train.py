"""Training the three small tokenizers of the embedded default (text, image, speech) from
a folder of media (`data.py` says how it is read)."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from omni_model.tokenizers.image import MagVitTokenizer
from omni_model.tokenizers.text import BPETokenizer
from omni_model.tokenizers.train_image import evaluate_image_tokenizer, train_image_tokenizer
from omni_model.tokenizers.train_speech import (evaluate_speech_codec, small_codec, train_code_decoder,
                                                train_speech_codec)
from pipelines.data.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES, find_files
from pipelines.tokenizers.config import TokenizersConfig
from pipelines.tokenizers.data import decoder_clips, read_audio, read_images, split_holdout, voice_clips
from pipelines.tokenizers.quality import checker_agreement, save_examples, save_reconstructions
from pipelines.tokenizers.shipped import training_settings

logger = logging.getLogger(__name__)


def check_data_folders(cfg: TokenizersConfig) -> None:
    """FileNotFoundError naming the first data folder of `cfg` that does not exist."""
    if not Path(cfg.data.dir).is_dir():
        raise FileNotFoundError(f"data folder {cfg.data.dir} does not exist")
    for folder in cfg.data.audio_dirs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"audio folder {folder} does not exist")


def train_tokenizers(cfg: TokenizersConfig) -> dict:
    """Train the text, image and speech tokenizers; save them under `cfg.out_dir`.

    Returns the quality report (also written to `quality.json`).
    """
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    check_data_folders(cfg)
    root = Path(cfg.data.dir)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}

    image_paths = find_files(root, IMAGE_SUFFIXES)[: cfg.data.max_images]
    voice = voice_clips(cfg.data)  # read first: a bad voice manifest fails before training
    audio_paths = [p for folder in (root, *cfg.data.audio_dirs)
                   for p in find_files(Path(folder), AUDIO_SUFFIXES)][: cfg.data.max_audio]
    text_lines = [line.strip() for p in find_files(root, (".txt",))
                  for line in p.read_text(errors="replace").splitlines() if line.strip()]
    logger.info("found %d images, %d audio files, %d text lines in %s", len(image_paths),
                len(audio_paths), len(text_lines), root)

    # ---- text
    if text_lines:
        train_text, held_text = split_holdout(text_lines, cfg.data.holdout, rng)
        start = time.perf_counter()
        bpe = BPETokenizer.train(train_text, cfg.text.vocab_size, cfg.text.min_frequency)
        bpe.save_pretrained(out / "text")
        held = held_text or train_text
        report["text"] = {
            "vocab_size": bpe.vocab_size, "lines": len(text_lines),
            "tokens_per_line": float(np.mean([len(bpe.encode(t)) for t in held])),
            "bytes_per_token": float(np.mean([len(t.encode()) / max(1, len(bpe.encode(t))) for t in held])),
            "train_seconds": time.perf_counter() - start, "fingerprint": bpe.fingerprint}

    # ---- image
    if image_paths:
        train_paths, held_paths = split_holdout(image_paths, cfg.data.holdout, rng)
        model = MagVitTokenizer(cfg.image.model_config())
        train_x = model.preprocess(read_images(train_paths))
        held_x = model.preprocess(read_images(held_paths)) if held_paths else train_x[:16]
        start = time.perf_counter()
        history = train_image_tokenizer(model, train_x, cfg.image.train)
        model.save_pretrained(out / "image")
        report["image"] = {**evaluate_image_tokenizer(model, held_x), **checker_agreement(model, held_x),
                           "train_images": len(train_x), "held_out_images": len(held_x),
                           "train_seconds": time.perf_counter() - start,
                           "final_train_loss": history[-1]["loss"] if history else None,
                           "fingerprint": model.fingerprint}
        save_reconstructions(model, held_x[:8], out / "image_reconstructions.png")

    # ---- speech
    if audio_paths:
        train_paths, held_paths = split_holdout(audio_paths, cfg.data.holdout, rng)
        train_w, train_t, train_read = read_audio(train_paths, cfg.data.max_audio_seconds)
        held_w, held_t, held_read = read_audio(held_paths or train_paths[:8], cfg.data.max_audio_seconds)
        fitted, said_again, draw = decoder_clips(train_read, held_read, voice, cfg.data.voice_draw)
        voice_w = [train_w[i] for i in fitted] + [held_w[i] for i in said_again]
        codec = small_codec(cfg.speech.codebook_size, cfg.speech.d_model, cfg.speech.layers, cfg.seed,
                            cfg.speech.pooling, cfg.speech.attention)
        start = time.perf_counter()
        train_speech_codec(codec, train_w, cfg.speech.train, train_t)
        if cfg.speech.decoder.steps:
            if not voice_w:
                raise ValueError(f"no training clip is a spoken output of {list(cfg.data.voice_manifests)}")
            train_code_decoder(codec, voice_w, cfg.speech.decoder, draw)
        codec.save_pretrained(out / "speech")
        train_s = time.perf_counter() - start
        transcribe = None
        if cfg.speech.asr and any(t is not None for t in held_t):
            from pipelines.evaluation.asr import WhisperRecognizer

            transcribe = WhisperRecognizer(threads=cfg.threads).transcribe
        quality = evaluate_speech_codec(codec, held_w, held_t, transcribe, cfg.speech.asr_utterances)
        fitted_held = set(said_again)
        in_voice = [] if voice is None else [i for i, p in enumerate(held_read)
                                             if p.resolve() in voice and i not in fitted_held]
        if in_voice and cfg.speech.decoder.steps:  # the ceiling of what the model says
            budget = max(1, (cfg.speech.asr_utterances or len(in_voice)) // 4)  # a quarter of the ASR's
            voice_q = evaluate_speech_codec(codec, [held_w[i] for i in in_voice], [held_t[i] for i in in_voice],
                                            transcribe, budget)
            quality |= {f"voice_{k}": voice_q[k] for k in
                        ("mel_l1", "wer_decoded", "wer_original", "wer_utterances") if k in voice_q}
        report["speech"] = {**quality,
                            "train_utterances": len(train_w), "held_out_utterances": len(held_w),
                            "decoder_utterances": len(voice_w) if cfg.speech.decoder.steps else 0,
                            "train_seconds": train_s, "fingerprint": codec.fingerprint}
        save_examples(codec, held_w[: cfg.speech.examples], out)

    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "trained_on.json").write_text(json.dumps(training_settings(cfg), indent=2) + "\n")
    return report
