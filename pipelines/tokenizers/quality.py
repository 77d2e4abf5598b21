"""How well trained tokenizers reconstruct: the world checker's agreement on decoded
images, reconstruction sheets and decoded speech examples, the quality report as a
table, and the same measures on a built world's held-out split."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from omni_model.tokenizers.codec import SpeechCodec
from omni_model.tokenizers.image import MagVitTokenizer
from omni_model.tokenizers.mel import SAMPLE_RATE
from omni_model.tokenizers.train_speech import evaluate_speech_codec
from pipelines.data.manifest import parse_line, read_lines, resolve_media
from pipelines.tokenizers.data import read_audio, read_images


def quality_on_world(tokenizers: str | Path, world: str | Path, transcribe: Callable[[torch.Tensor, int], str],
                     images: int = 48, clips: int = 24) -> dict:
    """How trained tokenizers read a built world's held-out split, in `quality.json`'s
    terms: the world checker's agreement on decoded images (`image.checker_*`) and the WER
    of decoded speech in the voice the model speaks (TTS targets: `speech.voice_*`)."""
    tokenizers, world = Path(tokenizers), Path(world)
    image_model = MagVitTokenizer.from_pretrained(tokenizers / "image")
    pictures = read_images(sorted((world / "eval" / "images").glob("*.png"))[:images])
    image_q = checker_agreement(image_model, image_model.preprocess(pictures))
    rows = [parse_line(line, world, check_files=False)
            for _, line in read_lines(world / "manifests" / "eval" / "tts.jsonl")][:clips]
    waves, texts, _ = read_audio([resolve_media(world, r.audios[0]) for r in rows], 30.0)
    codec = SpeechCodec.from_pretrained(tokenizers / "speech")
    speech_q = evaluate_speech_codec(codec, waves, texts, transcribe, clips)
    return {"image": image_q, "speech": {f"voice_{k}": v for k, v in speech_q.items()
                                         if k in ("mel_l1", "wer_decoded", "wer_original", "wer_utterances")}}


def checker_agreement(model: MagVitTokenizer, images: torch.Tensor) -> dict:
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


def save_reconstructions(model: MagVitTokenizer, images: torch.Tensor, path: Path) -> None:
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


def save_examples(codec, waves: list[torch.Tensor], out: Path) -> None:
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
