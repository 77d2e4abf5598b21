"""Training the three small tokenizers of the embedded default from a folder of media.

Folder conventions (any depth): images (`.png`, `.jpg`, ...); audio (`.wav`, `.flac`)
with an optional transcript `<same name>.txt` beside each file (used to score
intelligibility); text: every line of every other `.txt` file, plus the transcripts.
A held-out share of each is kept for the quality report.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from PIL import Image

from omni_model.config import to_dict
from omni_model.tokenizers.codec import SpeechCodec
from omni_model.tokenizers.image import MagVitConfig, MagVitTokenizer, TrunkConfig
from omni_model.tokenizers.mel import SAMPLE_RATE, resample, to_mono
from omni_model.tokenizers.text import BPETokenizer
from omni_model.tokenizers.train_image import (ImageTrainConfig, evaluate_image_tokenizer,
                                               train_image_tokenizer)
from omni_model.tokenizers.train_speech import (DecoderTrainConfig, SpeechTrainConfig, evaluate_speech_codec,
                                                small_codec, train_code_decoder, train_speech_codec)
from pipelines.data.manifest import ManifestError, parse_line, read_lines, resolve_media
from pipelines.data.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES, MediaError, find_files, load_audio, load_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    dir: str = "runs/world/media"  #: folder of images, audio (+ .txt transcripts) and text
    #: more folders whose audio also trains the speech codec (transcripts optional), e.g.
    #: SDVI's spoken questions and answers: other voices, single words
    audio_dirs: tuple[str, ...] = ()
    #: manifests whose spoken outputs (the audio of assistant turns: TTS targets, SDVI's
    #: spoken answers) are the voice the model speaks in; the frozen-code decoder is
    #: fitted to those training clips only, so it speaks in that one voice whatever voice
    #: the codes came from, as GLM-4-Voice's decoder does. Empty: every training clip.
    voice_manifests: tuple[str, ...] = ()
    voice_root: str = ""  #: the data root the voice manifests' media paths are relative to
    #: how often the decoder sees each voice clip: "clips" equally; "rows" as often as the
    #: voice manifests' rows say it (SDVI's 21 answer words, 2,400 rows, then weigh twice
    #: what the 1,200 captions do); "sqrt" in proportion to the square root of that (each
    #: answer ~10x a caption, the captions still most of the draws). A clip said by more
    #: than one row trains the decoder even where the split held it out of the codec's
    #: training: the model says it again and again, so the decoder must know it
    voice_draw: str = "sqrt"
    holdout: float = 0.1  #: share of each kind kept out of training for the quality report
    max_images: int | None = None  #: cap on images read (None: all)
    max_audio: int | None = None  #: cap on audio files read (None: all)
    max_audio_seconds: float = 30.0  #: longer files are skipped


@dataclass(frozen=True)
class TextTokenizerConfig:
    vocab_size: int = 1024
    min_frequency: int = 2


@dataclass(frozen=True)
class ImageTokenizerConfig:
    resolution: int = 32  #: square input size
    ch: int = 32  #: trunk width (a multiple of 32: GroupNorm has 32 groups)
    ch_mult: tuple[int, ...] = (1, 2, 2)  #: one entry per level; grid = resolution / 2^(levels-1)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    attn_resolutions: tuple[int, ...] = ()
    codebook_dim: int = 10  #: 2^codebook_dim codes
    train: ImageTrainConfig = field(default_factory=ImageTrainConfig)

    def model_config(self) -> MagVitConfig:
        trunk = TrunkConfig(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                            attn_resolutions=self.attn_resolutions, resolution=self.resolution,
                            z_channels=self.codebook_dim)
        return MagVitConfig(encoder=trunk, decoder=trunk, codebook_dim=self.codebook_dim,
                            resolution=self.resolution)


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    codebook_size: int = 512
    d_model: int = 128
    layers: int = 4  #: encoder layers (pooled after layer 2, quantized after the last)
    pooling: int = 4  #: 50 Hz frames pooled by this: 4 -> 12.5 codes/s (GLM-4-Voice), 2 -> 25
    attention: str = "causal"  #: the encoder's mask: causal, block_causal (GLM-4-Voice's) or full
    train: SpeechTrainConfig = field(default_factory=SpeechTrainConfig)
    decoder: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)  #: refit on frozen codes
    asr: bool = True  #: score decoded speech with the offline recogniser
    asr_utterances: int | None = 100  #: ... on at most this many held-out clips (each costs ~0.4 s)
    examples: int = 3  #: decoded WAV examples written to the output folder


@dataclass(frozen=True)
class TokenizersConfig:
    out_dir: str = "runs/tokenizers"
    seed: int = 0
    threads: int = 2
    #: a folder of tokenizers trained before (the project ships `pretrained/tokenizers`):
    #: used instead of training when its `trained_on.json` equals what this config would
    #: train on (`training_settings`), else the job trains and says why. None: always train
    shipped: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    speech: SpeechTokenizerConfig = field(default_factory=SpeechTokenizerConfig)


#: the settings of a built world (its `config.yaml`, SDVI's `manifests/sdvi/config.yaml`)
#: that tokenizers depend on; not its size or seed: more scenes of the same world read alike
WORLD_SETTINGS = {"world": ("image_size", "group_share", "caption_voices", "speed_range"),
                  "sdvi": ("question_voices", "answer_voices")}
#: config fields that change nothing in the trained tokenizers
_NOT_TRAINING = {"out_dir", "threads", "shipped", "data.dir", "data.audio_dirs", "data.voice_manifests",
                 "data.voice_root", "speech.asr", "speech.asr_utterances", "speech.examples",
                 "image.train.log_every", "speech.train.log_every", "speech.decoder.log_every"}


def training_settings(cfg: TokenizersConfig) -> dict:
    """What tokenizers trained by `cfg` depend on, flat (`image.train.steps`, ...): the
    tokenizer settings, and the world's when `data.voice_root` is a built world (`world.*`,
    `sdvi.*`; None for data of another kind)."""
    def flat(value, prefix: str = "") -> dict:
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    settings = {k: v for k, v in flat(to_dict(cfg)).items() if k not in _NOT_TRAINING}
    root = Path(cfg.data.voice_root) if cfg.data.voice_root else None
    for name, path in (("world", "config.yaml"), ("sdvi", "manifests/sdvi/config.yaml")):
        file = root / path if root is not None else None
        section = (yaml.safe_load(file.read_text()) or {}).get(name) if file and file.exists() else None
        for key in WORLD_SETTINGS[name]:
            settings[f"{name}.{key}"] = section.get(key) if section else None
    return json.loads(json.dumps(settings))  # tuples as lists, as the recorded file has them


def shipped_differences(cfg: TokenizersConfig, shipped: str | Path) -> list[str]:
    """Why the tokenizers in `shipped` are not what `cfg` would train (the settings that
    differ, or what is missing); empty when they are."""
    recorded_file = Path(shipped) / "trained_on.json"
    if not recorded_file.exists():
        return [f"{recorded_file} does not exist"]
    recorded, wanted = json.loads(recorded_file.read_text()), training_settings(cfg)
    if wanted.get("world.image_size") is None:
        return [f"{cfg.data.voice_root or cfg.data.dir} is not a built world (no world config.yaml)"]
    return [f"{key}: {recorded.get(key)!r} here {wanted.get(key)!r}" for key in sorted(set(recorded) | set(wanted))
            if recorded.get(key) != wanted.get(key)]


def use_shipped(cfg: TokenizersConfig) -> dict | None:
    """Copy the shipped tokenizers into `cfg.out_dir` when they match (`shipped_differences`)
    and return their quality report; None (and a log line saying why) when they must be
    trained."""
    if cfg.shipped is None:
        return None
    differences = shipped_differences(cfg, cfg.shipped)
    if differences:
        logger.warning("training the tokenizers: the shipped ones in %s were trained on other settings: %s",
                       cfg.shipped, "; ".join(differences[:5]))
        return None
    out = Path(cfg.out_dir)
    for part in ("text", "image", "speech"):
        if (Path(cfg.shipped) / part).exists():
            shutil.copytree(Path(cfg.shipped) / part, out / part, dirs_exist_ok=True)
    for name in ("quality.json", "trained_on.json"):
        shutil.copy(Path(cfg.shipped) / name, out / name)
    logger.info("using the shipped tokenizers of %s: trained on the same world and tokenizer settings", cfg.shipped)
    return json.loads((out / "quality.json").read_text())


def _split(items: list, holdout: float, rng: random.Random) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    n_out = max(1, round(len(items) * holdout)) if len(items) > 1 else 0
    return items[n_out:], items[:n_out]


def _read_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for p in paths:
        try:
            images.append(load_image(p))
        except MediaError as err:
            logger.warning("skipping %s: %s", p, err)
    return images


def _read_audio(paths: list[Path], max_seconds: float) -> tuple[list[torch.Tensor], list[str | None], list[Path]]:
    """Waveforms, transcripts (`<clip>.txt`, None where absent) and the paths read."""
    waves, texts, kept = [], [], []
    for p in paths:
        try:
            data, rate = load_audio(p, max_seconds)
        except MediaError as err:
            logger.warning("skipping %s: %s", p, err)
            continue
        waves.append(resample(to_mono(data), rate, SAMPLE_RATE))
        transcript = p.with_suffix(".txt")
        texts.append(transcript.read_text().strip() if transcript.exists() else None)
        kept.append(p)
    return waves, texts, kept


#: a voice clip's draw weight from the number of rows that say it; None: every clip
#: equally (train_code_decoder's own uniform draw)
VOICE_DRAWS: dict[str, Callable[[int], float] | None] = {"clips": None, "sqrt": math.sqrt, "rows": float}


def _voice_clips(data: DataConfig) -> Counter[Path] | None:
    """The resolved paths of the voice manifests' spoken outputs, with the number of rows
    that say each (None: no manifests)."""
    if data.voice_draw not in VOICE_DRAWS:
        raise ValueError(f"data.voice_draw must be one of {sorted(VOICE_DRAWS)}, not {data.voice_draw!r}")
    if not data.voice_manifests:
        return None
    if not data.voice_root:
        raise ValueError("data.voice_manifests needs data.voice_root (their media paths' root)")
    root, clips = Path(data.voice_root), Counter()
    for manifest in data.voice_manifests:
        for number, line in read_lines(manifest):
            try:
                sample = parse_line(line, root, check_files=False)
                clips.update(resolve_media(root, rel) for rel in sample.spoken_outputs())
            except ManifestError as err:
                logger.warning("%s line %d left out of the voice: %s", manifest, number, err)
    return clips


def decoder_clips(train: list[Path], held: list[Path], voice: Counter[Path] | None, draw: str
                  ) -> tuple[list[int], list[int], list[float] | None]:
    """The clips the frozen-code decoder is fitted to: indices of the training clips in the
    voice (all of them without voice manifests), indices of the held-out clips said by
    more than one row, and each one's draw weight in that order (None: drawn equally)."""
    if voice is None:
        return list(range(len(train))), [], None
    fitted = [i for i, p in enumerate(train) if p.resolve() in voice]
    said_again = [i for i, p in enumerate(held) if voice.get(p.resolve(), 0) > 1]
    weigh = VOICE_DRAWS[draw]
    if weigh is None:
        return fitted, said_again, None
    return fitted, said_again, [weigh(voice[p.resolve()]) for p in [*(train[i] for i in fitted),
                                                                     *(held[i] for i in said_again)]]


def train_tokenizers(cfg: TokenizersConfig) -> dict:
    """Train the text, image and speech tokenizers; save them under `cfg.out_dir`.

    Returns the quality report (also written to `quality.json`).
    """
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    root = Path(cfg.data.dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}

    image_paths = find_files(root, IMAGE_SUFFIXES)[: cfg.data.max_images]
    for folder in cfg.data.audio_dirs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"audio folder {folder} does not exist")
    voice = _voice_clips(cfg.data)  # read first: a bad voice manifest fails before training
    audio_paths = [p for folder in (root, *cfg.data.audio_dirs)
                   for p in find_files(Path(folder), AUDIO_SUFFIXES)][: cfg.data.max_audio]
    text_lines = [line.strip() for p in find_files(root, (".txt",))
                  for line in p.read_text(errors="replace").splitlines() if line.strip()]
    logger.info("found %d images, %d audio files, %d text lines in %s", len(image_paths),
                len(audio_paths), len(text_lines), root)

    # ---- text
    if text_lines:
        train_text, held_text = _split(text_lines, cfg.data.holdout, rng)
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
        train_paths, held_paths = _split(image_paths, cfg.data.holdout, rng)
        model = MagVitTokenizer(cfg.image.model_config())
        train_x = model.preprocess(_read_images(train_paths))
        held_x = model.preprocess(_read_images(held_paths)) if held_paths else train_x[:16]
        start = time.perf_counter()
        history = train_image_tokenizer(model, train_x, cfg.image.train)
        model.save_pretrained(out / "image")
        report["image"] = {**evaluate_image_tokenizer(model, held_x), **_checker_agreement(model, held_x),
                           "train_images": len(train_x), "held_out_images": len(held_x),
                           "train_seconds": time.perf_counter() - start,
                           "final_train_loss": history[-1]["loss"] if history else None,
                           "fingerprint": model.fingerprint}
        _save_reconstructions(model, held_x[:8], out / "image_reconstructions.png")

    # ---- speech
    if audio_paths:
        train_paths, held_paths = _split(audio_paths, cfg.data.holdout, rng)
        train_w, train_t, train_read = _read_audio(train_paths, cfg.data.max_audio_seconds)
        held_w, held_t, held_read = _read_audio(held_paths or train_paths[:8], cfg.data.max_audio_seconds)
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
            from pipelines.asr import WhisperRecognizer

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
        _save_examples(codec, held_w[: cfg.speech.examples], out)

    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "trained_on.json").write_text(json.dumps(training_settings(cfg), indent=2) + "\n")
    return report


def quality_on_world(tokenizers: str | Path, world: str | Path, transcribe: Callable[[torch.Tensor, int], str],
                     images: int = 48, clips: int = 24) -> dict:
    """How trained tokenizers read a built world's held-out split, in `quality.json`'s
    terms: the world checker's agreement on decoded images (`image.checker_*`) and the WER
    of decoded speech in the voice the model speaks (TTS targets: `speech.voice_*`)."""
    tokenizers, world = Path(tokenizers), Path(world)
    image_model = MagVitTokenizer.from_pretrained(tokenizers / "image")
    pictures = _read_images(sorted((world / "eval" / "images").glob("*.png"))[:images])
    image_q = _checker_agreement(image_model, image_model.preprocess(pictures))
    rows = [parse_line(line, world, check_files=False)
            for _, line in read_lines(world / "manifests" / "eval" / "tts.jsonl")][:clips]
    waves, texts, _ = _read_audio([resolve_media(world, r.audios[0]) for r in rows], 30.0)
    codec = SpeechCodec.from_pretrained(tokenizers / "speech")
    speech_q = evaluate_speech_codec(codec, waves, texts, transcribe, clips)
    return {"image": image_q, "speech": {f"voice_{k}": v for k, v in speech_q.items()
                                         if k in ("mel_l1", "wer_decoded", "wer_original", "wer_utterances")}}


def _checker_agreement(model: MagVitTokenizer, images: torch.Tensor) -> dict:
    """For synthetic-world images: the share whose decoded image the world's attribute
    checker reads as the same scene (colour, shape, position, size, count)."""
    from pipelines.world.checker import Agreement, check_image

    originals = _to_pil(images)
    decoded = model.decode_images(model.encode(images), model.grid_for(*images.shape[-2:]))
    agreement = Agreement()
    for original, rebuilt in zip(originals, decoded):
        truth = check_image(original)
        if truth.count:  # not a world image: nothing to compare
            agreement.add(truth, check_image(rebuilt))
    if not agreement.n:
        return {}
    return {f"checker_{k}": v for k, v in agreement.rates().items()} | {"checker_images": agreement.n}


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(((x.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy())
            for x in images]


def _save_reconstructions(model: MagVitTokenizer, images: torch.Tensor, path: Path) -> None:
    """Originals (top row) above their code round trips (bottom row)."""
    if len(images) == 0:
        return
    rec = model.decode_images(model.encode(images), model.grid_for(*images.shape[-2:]))
    orig = _to_pil(images)
    size = images.shape[-1]
    sheet = Image.new("RGB", (size * len(orig), size * 2), "white")
    for i, (a, b) in enumerate(zip(orig, rec)):
        sheet.paste(a, (i * size, 0))
        sheet.paste(b, (i * size, size))
    sheet.resize((sheet.width * 4, sheet.height * 4), Image.Resampling.NEAREST).save(path)


def _save_examples(codec, waves: list[torch.Tensor], out: Path) -> None:
    import soundfile as sf

    for i, (w, d) in enumerate(zip(waves, codec.decode(codec.encode(waves)))):
        sf.write(out / f"speech_example_{i}_original.wav", w.numpy(), SAMPLE_RATE)
        sf.write(out / f"speech_example_{i}_decoded.wav", d.numpy(), codec.sample_rate)


def format_report(report: dict) -> str:
    """The quality report as a Markdown table."""
    rows = ["| tokenizer | measure | value |", "| --- | --- | --- |"]
    labels = {
        "text": [("tokens_per_line", "BPE tokens per caption/line", "{:.1f}"),
                 ("vocab_size", "vocabulary", "{}")],
        "image": [("psnr_db", "held-out PSNR (dB)", "{:.2f}"),
                  ("codes_per_image", "codes per image", "{}"),
                  ("distinct_codes", "distinct codes used (held-out)", "{}"),
                  ("checker_overall", "decoded scenes the world checker reads as the original", "{:.1%}"),
                  ("checker_colour", "... same colours", "{:.1%}"),
                  ("checker_shape", "... same shapes", "{:.1%}"),
                  ("checker_position", "... same positions", "{:.1%}"),
                  ("checker_count", "... same count", "{:.1%}"),
                  ("train_seconds", "training time (s)", "{:.0f}")],
        "speech": [("codes_per_second", "codes per second", "{:.2f}"),
                   ("mel_l1", "mel L1, decoded vs original (log-mel units)", "{:.3f}"),
                   ("wer_decoded", "WER of decoded speech (Whisper tiny.en)", "{:.1%}"),
                   ("wer_original", "WER of the original audio (same recogniser)", "{:.1%}"),
                   ("voice_wer_decoded", "... held-out clips in the decoder's voice: WER decoded", "{:.1%}"),
                   ("voice_wer_original", "... the same clips, original", "{:.1%}"),
                   ("distinct_codes", "distinct codes used (held-out)", "{}"),
                   ("train_seconds", "training time (s)", "{:.0f}")],
    }
    for kind, items in labels.items():
        for key, label, fmt in items:
            if kind in report and report[kind].get(key) is not None:
                rows.append(f"| {kind} | {label} | {fmt.format(report[kind][key])} |")
    return "\n".join(rows)
