"""The embedded speech codec: a small GLM-4-Voice-architecture tokenizer plus a decoder.

`SpeechCodec.encode` is exactly `GLM4VoiceTokenizer.encode` (same architecture, small
width, trained on the world's TTS audio). `decode` embeds codes with the tokenizer's own
codebook, runs `CodeToMel` (a bidirectional transformer at the code rate whose output
head emits the `samples_per_code / hop` log-mel frames of each code, then a small
convolutional post-net), and vocodes the mels with Griffin-Lim.

Folder layout: `tokenizer/` (the GLM-4-Voice layout, loadable on its own), `decoder/`
(`config.json` + `model.safetensors`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from omni_model.model_folder import read_config
from omni_model.tokenizers.base import load_strict, save_folder
from omni_model.tokenizers.mel import SAMPLE_RATE, mel_to_waveform
from omni_model.tokenizers.speech import GLM4VoiceTokenizer, SpeechDecoder, Waveforms


@dataclass(frozen=True)
class CodeToMelConfig:
    d_model: int = 192
    layers: int = 3
    heads: int = 4
    ffn: int = 512
    code_dim: int = 128  #: the tokenizer's d_model (codebook row width)
    n_mels: int = 128
    frames_per_code: int = 8  #: samples_per_code / hop_length
    max_codes: int = 512  #: longest decodable utterance, in codes (41 s at 12.5/s, 20 s at 25/s)

    @classmethod
    def from_dict(cls, data: dict) -> "CodeToMelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class CodeToMel(nn.Module):
    """Code vectors `[B, N, code_dim]` -> log-mel `[B, n_mels, N * frames_per_code]`."""

    def __init__(self, cfg: CodeToMelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.proj_in = nn.Linear(cfg.code_dim, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_codes, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ffn, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.proj_out = nn.Linear(cfg.d_model, cfg.n_mels * cfg.frames_per_code)
        self.postnet = nn.Sequential(
            nn.Conv1d(cfg.n_mels, 256, 5, padding=2), nn.GELU(),
            nn.Conv1d(256, cfg.n_mels, 5, padding=2))

    def forward(self, vectors: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = vectors.shape
        if n > self.config.max_codes:
            raise ValueError(f"{n} codes exceed the decoder's {self.config.max_codes}")
        h = self.proj_in(vectors) + self.positions.weight[:n]
        pad = None if valid is None else ~valid.bool()
        h = self.norm(self.layers(h, src_key_padding_mask=pad))
        mel = self.proj_out(h).view(b, n, self.config.frames_per_code, self.config.n_mels)
        mel = mel.reshape(b, n * self.config.frames_per_code, self.config.n_mels).transpose(1, 2)
        return mel + self.postnet(mel)


class SpeechCodec(nn.Module, SpeechDecoder):
    """Waveforms <-> codes for the embedded default (encode: GLM-4-Voice architecture)."""

    name = "speech-codec"

    def __init__(self, tokenizer: GLM4VoiceTokenizer, decoder: CodeToMel,
                 griffin_lim_iterations: int = 48) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.griffin_lim_iterations = griffin_lim_iterations
        self.sample_rate = tokenizer.mel.sample_rate
        fpc = tokenizer.samples_per_code // tokenizer.mel.hop_length
        if decoder.config.frames_per_code != fpc or decoder.config.code_dim != tokenizer.config.d_model:
            raise ValueError("decoder shape does not match the tokenizer "
                             f"(frames_per_code {fpc}, code_dim {tokenizer.config.d_model})")

    @property
    def codebook_size(self) -> int:
        return self.tokenizer.codebook_size

    @property
    def codes_per_second(self) -> float:
        return self.tokenizer.codes_per_second

    @property
    def fingerprint(self) -> str:
        """The tokenizer's fingerprint: shards depend on the codes, not on the decoder."""
        return self.tokenizer.fingerprint

    can_decode = True  #: the code-to-mel decoder and Griffin-Lim

    def encode(self, waveforms: Waveforms, sample_rate: int = SAMPLE_RATE) -> list[torch.Tensor]:
        return self.tokenizer.encode(waveforms, sample_rate)

    @torch.no_grad()
    def decode_mel(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Codes -> predicted log-mel `[n_mels, frames]` per utterance."""
        book = self.tokenizer.encoder.codebook.weight
        out = []
        for c in codes:
            c = torch.as_tensor(c, dtype=torch.long, device=book.device).reshape(-1)
            if c.numel() == 0:
                raise ValueError("cannot decode an empty code sequence")
            if c.min() < 0 or c.max() >= self.codebook_size:
                raise ValueError(f"speech codes must lie in [0, {self.codebook_size})")
            out.append(self.decoder(book[c][None])[0])
        return out

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Codes -> 16 kHz waveforms (Griffin-Lim)."""
        return [mel_to_waveform(m[None], self.tokenizer.mel, self.griffin_lim_iterations)[0].cpu()
                for m in self.decode_mel(codes)]

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "SpeechCodec":
        path = Path(path)
        tokenizer = GLM4VoiceTokenizer.from_pretrained(path / "tokenizer", device)
        decoder = CodeToMel(CodeToMelConfig.from_dict(read_config(path / "decoder"))).to(device)
        load_strict(decoder, path / "decoder", device)
        return cls(tokenizer, decoder.eval())

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        self.tokenizer.save_pretrained(path / "tokenizer")
        save_folder(self.decoder, path / "decoder", dataclasses.asdict(self.decoder.config))
        return path
