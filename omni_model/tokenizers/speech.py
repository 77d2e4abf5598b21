"""Speech tokenizers: GLM-4-Voice's (Whisper encoder + pooling + VQ) and the embedded codec.

**GLM-4-Voice tokenizer** (`GLM4VoiceTokenizer`, Zeng et al. 2024): a Whisper encoder
with causal convolutions and block-causal attention, cut at `quantize_position`; after
layer `pooling_position` the 50 Hz hidden states are average-pooled by
`pooling_kernel_size` (12.5 Hz for the real one) and a second position table is used;
after layer `quantize_position` each vector is replaced by the index of its nearest
codebook row. Loads the real `glm-4-voice-tokenizer` folder (`config.json`,
`model.safetensors`, optionally `preprocessor_config.json`). Long audio is cut into 30 s
windows, each encoded on its own, as the original `extract_speech_token` does.

**Embedded codec** (`SpeechCodec`): the embedded default must also *speak*, and
GLM-4-Voice's decoder (a flow-matching model plus a HiFT vocoder) cannot be fetched here.
So the tiny world trains its own: the same tokenizer architecture at a small width, plus
`CodeToMel`, a transformer from codes to Whisper log-mel frames, vocoded by Griffin-Lim
(`mel.mel_to_waveform`). GLM-4-Voice's real decoder is `omni_model.tokenizers.glm4voice.
GLM4VoiceDecoder` (the released `glm-4-voice-decoder` folder), attached as `decoder=`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omni_model.activations import ACTIVATIONS
from omni_model.config import with_extra
from omni_model.model_folder import read_config
from omni_model.tokenizers.base import check_finite, fingerprint, load_strict, save_folder
from omni_model.tokenizers.mel import SAMPLE_RATE, MelConfig, log_mel, resample, to_mono

WINDOW_SECONDS = 30  #: the original's segment length for long audio

Waveforms = Sequence[np.ndarray | torch.Tensor] | torch.Tensor


@dataclass(frozen=True)
class WhisperVQConfig:
    """The fields of GLM-4-Voice's `WhisperVQConfig` that shape the tokenizer."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    pooling_kernel_size: int | None = 4
    pooling_type: str = "avg"
    pooling_position: int | None = 16
    quantize_vocab_size: int = 16384
    quantize_position: int = 16
    quantize_causal_block_size: int | None = 200
    quantize_encoder_only: bool = True
    encoder_causal_convolution: bool = True
    activation_function: str = "gelu"
    #: How frames attend to each other. `causal` (each frame sees itself and earlier
    #: frames), `block_causal` (also every frame of its own block of
    #: `quantize_causal_block_size` frames) or `full` (plain Whisper). Not a key of the
    #: original config: None derives it as GLM-4-Voice's code does, from
    #: `encoder_causal_attention` / `quantize_causal_encoder` (causal layers) and
    #: `quantize_causal_block_size` (the block mask, else the padding mask alone).
    #: Configs this project writes carry it.
    attention_mode: str | None = None
    #: Keys of the source config we do not interpret, written back unchanged.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.attention_mode is None:
            causal = self.extra.get("encoder_causal_attention") or self.extra.get("quantize_causal_encoder")
            mode = "causal" if causal else "block_causal" if self.quantize_causal_block_size else "full"
            object.__setattr__(self, "attention_mode", mode)
        # what GLM-4-Voice's WhisperVQEncoder cannot run, or runs without making codes
        if self.attention_mode not in ("causal", "block_causal", "full"):
            raise ValueError(f"unknown attention_mode {self.attention_mode!r} (causal, block_causal or full)")
        if self.attention_mode == "block_causal" and not self.quantize_causal_block_size:
            raise ValueError("attention_mode block_causal needs quantize_causal_block_size")
        if self.pooling_kernel_size is not None and self.pooling_type not in ("avg", "max"):
            raise ValueError(f"pooling_type {self.pooling_type!r}: GLM-4-Voice pools with 'avg' or 'max'")
        if self.quantize_vocab_size is None:
            raise ValueError("quantize_vocab_size is null: the checkpoint has no codebook and makes no speech codes")
        layers = self.quantize_position if self.quantize_encoder_only else self.encoder_layers
        if not 1 <= self.quantize_position <= layers:
            raise ValueError(f"quantize_position {self.quantize_position} is not a layer of the "
                             f"{layers}-layer encoder: no codes would be made")
        if self.pooling_position is not None and self.pooling_position > self.quantize_position:
            raise ValueError(f"pooling_position {self.pooling_position} lies after quantize_position "
                             f"{self.quantize_position} (the original asserts quantize_position >= pooling_position)")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function {self.activation_function!r}: one of {sorted(ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WhisperVQConfig":
        return with_extra(cls, data)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "extra"})
        out.setdefault("model_type", "whisper")
        return out

    @property
    def conv_stride(self) -> int:
        return 2  # conv1 stride 1, conv2 stride 2

    @property
    def pools(self) -> bool:
        """Whether the encoder pools: a kernel, and a pooling layer at or before quantization."""
        return bool(self.pooling_kernel_size and self.pooling_position
                    and self.pooling_position <= self.quantize_position)

    @property
    def pool(self) -> int:
        """Frames per code after the convolutions (1 without pooling)."""
        return self.pooling_kernel_size if self.pools else 1


class CausalConv1d(nn.Conv1d):
    """A Conv1d that pads only on the left, so no output sees the future."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(cin, cout, kernel_size, stride=stride, padding=0)
        self.left_padding = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_padding, 0)))


class WhisperAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = ACTIVATIONS[activation]
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = WhisperAttention(dim, heads)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))


def frame_attention_mask(valid: torch.Tensor, mode: str, block: int | None) -> torch.Tensor:
    """Additive `[B, 1, N, N]` mask over frames; padding keys are always hidden.

    `causal`: key j visible to query i when j <= i, padding or not (GLM-4-Voice's causal
    layers run SDPA's `is_causal` without the padding mask; padding only follows the
    frames, so no real frame sees it); `block_causal`: also when both lie in the same
    block of `block` frames; `full`: all keys. Additive (finfo.min) rather than boolean,
    like the reference, so a padding query that may attend to nothing still gets a
    finite softmax.
    """
    b, n = valid.shape
    idx = torch.arange(n, device=valid.device)
    if mode == "full":
        allowed = torch.ones(n, n, dtype=torch.bool, device=valid.device)
    else:
        allowed = idx[None, :] <= idx[:, None]
        if mode == "block_causal" and block:
            allowed = allowed | (idx[None, :] // block == idx[:, None] // block)
    allowed = allowed[None] & (valid.bool()[:, None, :] if mode != "causal" else True)
    mask = torch.zeros(b, 1, n, n, device=valid.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


class WhisperVQEncoder(nn.Module):
    """Log-mel features -> pooled, quantized hidden states and their codes."""

    def __init__(self, cfg: WhisperVQConfig) -> None:
        super().__init__()
        self.config = cfg
        conv = CausalConv1d if cfg.encoder_causal_convolution else None
        if conv is None:
            self.conv1 = nn.Conv1d(cfg.num_mel_bins, cfg.d_model, 3, padding=1)
            self.conv2 = nn.Conv1d(cfg.d_model, cfg.d_model, 3, stride=2, padding=1)
        else:
            self.conv1 = CausalConv1d(cfg.num_mel_bins, cfg.d_model, 3)
            self.conv2 = CausalConv1d(cfg.d_model, cfg.d_model, 3, stride=2)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, cfg.d_model)
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(cfg.d_model, cfg.encoder_attention_heads, cfg.encoder_ffn_dim,
                                cfg.activation_function)
            for _ in range(cfg.quantize_position))  # the layers after quantization make no codes
        self.codebook = nn.Embedding(cfg.quantize_vocab_size, cfg.d_model)
        self.embed_positions2 = nn.Embedding(math.ceil(cfg.max_source_positions / (cfg.pooling_kernel_size or 1)),
                                             cfg.d_model)

    def hidden_states(self, features: torch.Tensor, attention_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous hidden states at the quantization point `[B, N, D]`, and validity."""
        cfg = self.config
        stride = cfg.conv_stride
        valid = attention_mask[:, ::stride]
        block = cfg.quantize_causal_block_size
        mask = frame_attention_mask(valid, cfg.attention_mode, block)
        h = F.gelu(self.conv2(F.gelu(self.conv1(features))))
        h = h.transpose(1, 2)
        if h.shape[1] > self.embed_positions.num_embeddings:
            raise ValueError(f"{h.shape[1]} frames exceed the {self.embed_positions.num_embeddings}"
                             " positions of the encoder (use 30 s windows)")
        h = h + self.embed_positions.weight[: h.shape[1]]
        for i, layer in enumerate(self.layers):
            h = layer(h, mask)
            if cfg.pooling_kernel_size and i + 1 == cfg.pooling_position:
                k = cfg.pooling_kernel_size
                h = h.transpose(1, 2)
                if h.shape[-1] % k:  # zero-padded, as the original (zeros count in the window)
                    h = F.pad(h, (0, k - h.shape[-1] % k))
                pool = F.max_pool1d if cfg.pooling_type == "max" else F.avg_pool1d
                h = pool(h, k).transpose(1, 2)
                valid = valid[:, ::k]
                mask = frame_attention_mask(valid, cfg.attention_mode, block and block // k)
        return h, valid

    def quantize(self, h: torch.Tensor) -> torch.Tensor:
        """Nearest codebook row (squared Euclidean distance) of every vector."""
        book = self.codebook.weight
        dist = (h.pow(2).sum(-1, keepdim=True) - 2 * h @ book.T + book.pow(2).sum(-1))
        return dist.argmin(-1)


class GLM4VoiceTokenizer(nn.Module):
    """The GLM-4-Voice speech tokenizer: waveforms or log-mel features -> codes."""

    name = "glm4voice"

    def __init__(self, config: WhisperVQConfig = WhisperVQConfig(),
                 mel: MelConfig | None = None, decoder: "SpeechDecoder | None" = None) -> None:
        super().__init__()
        self.config = config
        self.mel = mel or MelConfig(n_mels=config.num_mel_bins)
        self.encoder = WhisperVQEncoder(config)
        self.decoder = decoder

    @property
    def codebook_size(self) -> int:
        return self.config.quantize_vocab_size

    @property
    def samples_per_code(self) -> int:
        return self.config.conv_stride * self.config.pool * self.mel.hop_length

    @property
    def codes_per_second(self) -> float:
        return self.mel.sample_rate / self.samples_per_code

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.name, {**self.config.to_dict(), "mel": dataclasses.asdict(self.mel)},
                           self.encoder.state_dict())

    @property
    def can_decode(self) -> bool:
        """Only with a decoder attached (`GLM4VoiceDecoder`: GLM-4-Voice's own)."""
        return self.decoder is not None

    @property
    def output_sample_rate(self) -> int:
        """The rate of decoded waveforms: the attached decoder's (22,050 Hz for GLM-4-Voice's)."""
        return int(self.decoder.sample_rate) if self.decoder is not None else self.mel.sample_rate

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode_features(self, input_features: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, n_mels, F]` features (F a multiple of the code stride) -> `[B, F / 8]` codes.

        Codes of padding (where `attention_mask` is 0) are computed but meaningless;
        `encode` trims them.
        """
        if input_features.dim() != 3 or input_features.shape[1] != self.config.num_mel_bins:
            raise ValueError(f"expected features [B, {self.config.num_mel_bins}, frames], "
                             f"got {tuple(input_features.shape)}")
        check_finite(input_features, "input_features")
        features = input_features.to(self.device, torch.float32)
        if attention_mask is None:
            attention_mask = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long)
        h, _ = self.encoder.hidden_states(features, attention_mask.to(self.device))
        return self.encoder.quantize(h)

    def features(self, waveforms: Waveforms, sample_rate: int
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Waveforms -> padded features, frame mask and the number of valid codes of each.

        Each waveform is made mono, resampled to 16 kHz and zero-padded to the longest
        in the batch, rounded up to a whole number of codes (as the reference's
        `pad_to_multiple_of=stride`).
        """
        waves = [self._prepare(w, sample_rate) for w in _as_list(waveforms)]
        stride = self.samples_per_code
        longest = max(len(w) for w in waves)
        total = math.ceil(longest / stride) * stride
        batch = torch.zeros(len(waves), total)
        mask = torch.zeros(len(waves), total // self.mel.hop_length, dtype=torch.long)
        n_codes = []
        for i, w in enumerate(waves):
            batch[i, : len(w)] = w
            frames = math.ceil(len(w) / self.mel.hop_length)
            mask[i, :frames] = 1
            n_codes.append(math.ceil(len(w) / stride))
        feats = log_mel(batch.to(self.device), self.mel)
        return feats, mask, n_codes

    def _prepare(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
        w = to_mono(waveform)
        if w.numel() == 0:
            raise ValueError("empty audio")
        check_finite(w, "audio")
        return resample(w, sample_rate, self.mel.sample_rate)

    @torch.no_grad()
    def encode(self, waveforms: Waveforms, sample_rate: int = SAMPLE_RATE) -> list[torch.Tensor]:
        """Waveforms (any rate, mono or multi-channel) -> one 1-D code tensor each.

        Audio longer than 30 s is cut into 30 s windows encoded independently and their
        codes concatenated, like GLM-4-Voice's `extract_speech_token`.
        """
        waves = [self._prepare(w, sample_rate) for w in _as_list(waveforms)]
        window = WINDOW_SECONDS * self.mel.sample_rate
        pieces, owner = [], []
        for i, w in enumerate(waves):
            for start in range(0, len(w), window):
                pieces.append(w[start:start + window])
                owner.append(i)
        feats, mask, n_codes = self.features(pieces, self.mel.sample_rate)
        codes = self.encode_features(feats, mask).cpu()
        out: list[list[torch.Tensor]] = [[] for _ in waves]
        for row, i in enumerate(owner):
            out[i].append(codes[row, : n_codes[row]])
        return [torch.cat(parts) for parts in out]

    # ------------------------------------------------------------------ decoding
    def decode(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Codes -> waveforms, through the attached decoder (GLM-4-Voice ships none here)."""
        if self.decoder is None:
            raise RuntimeError("this speech tokenizer has no decoder attached: pass "
                               "decoder=GLM4VoiceDecoder.from_folder(<glm-4-voice-decoder>) "
                               "(omni_model.tokenizers.glm4voice) or use the embedded SpeechCodec")
        return self.decoder.decode(codes)

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        decoder: "SpeechDecoder | None" = None) -> "GLM4VoiceTokenizer":
        path = Path(path)
        config = WhisperVQConfig.from_dict(read_config(path))
        mel = MelConfig(n_mels=config.num_mel_bins)
        pre = path / "preprocessor_config.json"
        if pre.exists():
            p = json.loads(pre.read_text())
            mel = MelConfig(sample_rate=int(p.get("sampling_rate", mel.sample_rate)),
                            n_fft=int(p.get("n_fft", mel.n_fft)),
                            hop_length=int(p.get("hop_length", mel.hop_length)),
                            n_mels=int(p.get("feature_size", mel.n_mels)))
        model = cls(config, mel, decoder).to(device)
        # a full encoder (quantize_encoder_only false) holds layers past the codes and a final
        # norm; an EMA-trained codebook its running counts: the format's, not the codes'
        after = tuple(f"layers.{i}." for i in range(config.quantize_position, config.encoder_layers))
        load_strict(model.encoder, path, device, unused=(*after, "layer_norm.", "ema_count", "ema_weight"))
        return model.eval()

    def save_pretrained(self, path: str | Path) -> Path:
        path = save_folder(self.encoder, path, self.config.to_dict())
        (Path(path) / "preprocessor_config.json").write_text(json.dumps({
            "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": self.mel.n_mels,
            "sampling_rate": self.mel.sample_rate, "hop_length": self.mel.hop_length,
            "n_fft": self.mel.n_fft, "chunk_length": WINDOW_SECONDS}, indent=2) + "\n")
        return path


def _as_list(waveforms: Waveforms) -> list:
    if isinstance(waveforms, torch.Tensor) and waveforms.dim() == 1:
        return [waveforms]
    if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
        return [waveforms]
    items = list(waveforms)
    if not items:
        raise ValueError("no audio given")
    return items


# ---------------------------------------------------------------------- decoders
class SpeechDecoder:
    """Interface of a code -> waveform decoder: `decode(codes) -> list of waveforms`."""

    sample_rate: int

    def decode(self, codes: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
