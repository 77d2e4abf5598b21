"""Media and text tokenizers: they turn raw text, images and speech into codes and back.

`load_image_tokenizer(folder)` and `load_speech_tokenizer(folder)` are the one way a
folder becomes a tokenizer (the `ImageTokenizer` / `SpeechTokenizer` protocols of
`base.py`); imports are lazy so that `import omni_model.tokenizers` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from omni_model.tokenizers.base import ImageTokenizer, SpeechTokenizer


def load_image_tokenizer(path: str | Path, device: str = "cpu") -> ImageTokenizer:
    """A MAGVIT-v2 folder (`config.json` + `model.safetensors`), in eval mode."""
    from omni_model.tokenizers.image import MagVitTokenizer

    return MagVitTokenizer.from_pretrained(path, device).eval()


def load_speech_tokenizer(path: str | Path, device: str = "cpu", decoder: bool = True) -> SpeechTokenizer:
    """A SpeechCodec folder (`tokenizer/` + `decoder/`: speech in and out) or a bare
    GLM-4-Voice tokenizer folder (speech in; out as codes only, `can_decode` False), in
    eval mode. `decoder=False` loads only the tokenizer of a codec folder (encoding only:
    the tokenize job)."""
    path = Path(path)
    if decoder and (path / "decoder").is_dir():
        from omni_model.tokenizers.codec import SpeechCodec

        return SpeechCodec.from_pretrained(path, device).eval()
    from omni_model.tokenizers.speech import GLM4VoiceTokenizer

    folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    return GLM4VoiceTokenizer.from_pretrained(folder, device).eval()


__all__ = ["ImageTokenizer", "SpeechTokenizer", "load_image_tokenizer", "load_speech_tokenizer"]
