"""Training the embedded speech codec: a small GLM-4-Voice-architecture tokenizer and its
code-to-mel decoder, end to end on 16 kHz speech.

The encoder's hidden states at the quantization point are replaced by their nearest
codebook rows with a straight-through gradient (VQ-VAE, van den Oord et al. 2017:
codebook loss ||sg(h) - q||^2, commitment beta ||h - sg(q)||^2); the decoder
reconstructs the utterance's Whisper log-mel frames from the quantized vectors (L1).
Codebook rows unused for `restart_every` steps are restarted on random encoder outputs,
so the codebook does not collapse onto a few entries. The reconstruction target makes
these codes acoustic rather than GLM-4-Voice's ASR-supervised semantic ones: what the
embedded default needs is a codec it can both read and speak.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from omni_model.tokenizers.codec import CodeToMel, CodeToMelConfig, SpeechCodec
from omni_model.tokenizers.speech import GLM4VoiceTokenizer, WhisperVQConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeechTrainConfig:
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3  #: peak learning rate (warmup 5%, cosine to 10%)
    commitment: float = 0.25  #: beta
    restart_every: int = 100  #: steps between dead-code restarts (0: never)
    seed: int = 0
    log_every: int = 100


def small_codec(codebook_size: int = 512, d_model: int = 128, layers: int = 4,
                seed: int = 0, pooling: int = 4, attention: str = "causal") -> SpeechCodec:
    """A fresh small codec: pooling after layer 2 by `pooling` (4: 12.5 codes/s as
    GLM-4-Voice; 2: 25 codes/s), quantized after `layers`; `attention` is the encoder's
    mask (`WhisperVQConfig.attention_mode`; `block_causal` with GLM-4-Voice's 200-frame
    blocks sees a whole short utterance)."""
    torch.manual_seed(seed)
    cfg = WhisperVQConfig(d_model=d_model, encoder_layers=layers, encoder_attention_heads=4,
                          encoder_ffn_dim=2 * d_model, pooling_position=2, pooling_kernel_size=pooling,
                          quantize_position=layers, quantize_vocab_size=codebook_size,
                          quantize_causal_block_size=(WhisperVQConfig.quantize_causal_block_size
                                                      if attention == "block_causal" else None),
                          attention_mode=attention)
    tokenizer = GLM4VoiceTokenizer(cfg)
    fpc = tokenizer.samples_per_code // tokenizer.mel.hop_length
    decoder = CodeToMel(CodeToMelConfig(code_dim=d_model, n_mels=cfg.num_mel_bins, frames_per_code=fpc,
                                        max_codes=math.ceil(41 * tokenizer.codes_per_second)))
    return SpeechCodec(tokenizer, decoder)


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (x * valid).sum() / valid.sum().clamp(min=1)


def train_speech_codec(codec: SpeechCodec, waveforms: Sequence[torch.Tensor],
                       cfg: SpeechTrainConfig = SpeechTrainConfig()) -> list[dict[str, float]]:
    """Fit `codec` to 16 kHz mono `waveforms`; returns the logged metrics."""
    if not waveforms:
        raise ValueError("no audio to train on")
    gen = torch.Generator().manual_seed(cfg.seed)
    tok, dec = codec.tokenizer, codec.decoder
    encoder = tok.encoder
    params = list(encoder.parameters()) + list(dec.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) /
                                                                          max(1, cfg.steps - warmup))))
    usage = torch.zeros(tok.codebook_size)
    history: list[dict[str, float]] = []
    codec.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(waveforms), (min(cfg.batch_size, len(waveforms)),), generator=gen)
        feats, mask, _ = tok.features([waveforms[i] for i in idx.tolist()], tok.mel.sample_rate)
        h, valid = encoder.hidden_states(feats, mask.to(feats.device))
        valid = valid.float()
        if step == 0:
            _init_codebook(encoder.codebook.weight, h.detach(), valid, gen)
        codes = encoder.quantize(h.detach())
        q = encoder.codebook(codes)
        codebook_loss = _masked_mean((q - h.detach()).pow(2).mean(-1), valid)
        commit_loss = _masked_mean((h - q.detach()).pow(2).mean(-1), valid)
        mel = dec(h + (q - h).detach(), valid)
        frame_valid = valid.repeat_interleave(dec.config.frames_per_code, dim=1)[:, None]
        recon = _masked_mean((mel - feats).abs(), frame_valid.expand_as(mel))
        loss = recon + codebook_loss + cfg.commitment * commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        usage += torch.bincount(codes[valid.bool()].cpu(), minlength=tok.codebook_size)
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.steps:
            _restart_dead_codes(encoder.codebook.weight, usage, h.detach(), valid, gen)
            usage.zero_()
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            m = {"step": step, "loss": loss.item(), "mel_l1": recon.item(),
                 "commit": commit_loss.item()}
            history.append(m)
            logger.info("speech codec step %d loss %.4f mel L1 %.4f (%.0fs)", step, m["loss"],
                        m["mel_l1"], time.perf_counter() - start)
    codec.eval()
    return history


def _pick_vectors(h: torch.Tensor, valid: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    pool = h[valid.bool()]
    idx = torch.randint(0, pool.shape[0], (n,), generator=gen)
    noise = torch.randn(n, pool.shape[1], generator=gen).to(pool.device)
    return pool[idx] + 0.01 * pool.std() * noise


@torch.no_grad()
def _init_codebook(book: torch.Tensor, h: torch.Tensor, valid: torch.Tensor,
                   gen: torch.Generator) -> None:
    book.copy_(_pick_vectors(h, valid, book.shape[0], gen))


@torch.no_grad()
def _restart_dead_codes(book: torch.Tensor, usage: torch.Tensor, h: torch.Tensor,
                        valid: torch.Tensor, gen: torch.Generator) -> None:
    dead = (usage == 0).nonzero().squeeze(1)
    if dead.numel():
        book[dead.to(book.device)] = _pick_vectors(h, valid, dead.numel(), gen)


@torch.no_grad()
def evaluate_speech_codec(codec: SpeechCodec, waveforms: Sequence[torch.Tensor],
                          transcripts: Sequence[str | None] | None = None,
                          transcribe: Callable[[torch.Tensor, int], str] | None = None
                          ) -> dict[str, float]:
    """Codes per second, mel L1 of decoded vs original (log-mel units), codebook use, and
    the word error rate of decoded speech when a recogniser and transcripts are given
    (over the utterances that have a transcript)."""
    tok = codec.tokenizer
    codes = codec.encode(list(waveforms), tok.mel.sample_rate)
    seconds = sum(len(w) for w in waveforms) / tok.mel.sample_rate
    distances = []
    for w, c, mel in zip(waveforms, codes, codec.decode_mel(codes)):
        feats, mask, _ = tok.features([w], tok.mel.sample_rate)
        frames = int(mask.sum())
        distances.append((mel[:, :frames] - feats[0, :, :frames]).abs().mean().item())
    out = {"codes_per_second": sum(len(c) for c in codes) / seconds,
           "mel_l1": sum(distances) / len(distances),
           "distinct_codes": int(torch.cat(codes).unique().numel()),
           "codebook_size": codec.codebook_size}
    if transcribe is not None and transcripts is not None and any(t is not None for t in transcripts):
        from omni_model.metrics import word_error_rate

        known = [i for i, t in enumerate(transcripts) if t is not None]
        decoded = codec.decode([codes[i] for i in known])
        hyps = [transcribe(w, codec.sample_rate) for w in decoded]
        refs = [transcribe(waveforms[i], tok.mel.sample_rate) for i in known]
        texts = [transcripts[i] for i in known]
        out["wer_decoded"] = word_error_rate(texts, hyps)
        out["wer_original"] = word_error_rate(texts, refs)
        out["wer_utterances"] = len(known)
    return out
