"""A handful of multimodal-shaped samples and a single-process fitting loop.

The smallest honest end-to-end check of the core: train a tiny model with the diffusion
objective until it has memorised a few caption / text-to-image / TTS / ASR samples, then
let the sampler regenerate every response from its prompt alone. The "image" and
"speech" codes are random (seeded) stand-ins for tokenizer output. The distributed
training loop of the real stages lives in `pipelines/train/`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from omni_model.batching import collate
from omni_model.masking import add_tail_pad
from omni_model.objective import Objective, diffusion_loss_of_batch
from omni_model.sampler import Region, SamplerConfig, generate, make_layout
from omni_model.templates import (Image, Message, Part, Speech, Text, decode_response,
                                  encode_parts, encode_prompt, encode_sample)
from omni_model.tokenizers.text import TextTokenizer
from omni_model.transformer import Transformer, TransformerConfig
from omni_model.vocab import Vocab

logger = logging.getLogger(__name__)


def toy_vocab(tokenizer: TextTokenizer, image_codes: int = 64, speech_codes: int = 64) -> Vocab:
    return Vocab.fresh(tokenizer.vocab_size, image_codes, speech_codes)


def toy_model(vocab: Vocab, hidden: int = 128, layers: int = 3, heads: int = 4,
              kv_heads: int = 2, seed: int = 0) -> Transformer:
    config = TransformerConfig(vocab_size=vocab.size, hidden_size=hidden,
                               intermediate_size=hidden * 3, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv_heads,
                               max_position_embeddings=512, mask_token_id=vocab.mask_id,
                               pad_token_id=vocab.pad_id)
    return Transformer.from_config(config, seed=seed)


def toy_samples(vocab: Vocab, seed: int = 0, image_len: int = 16,
                speech_len: int = 12) -> list[list[Message]]:
    """Eight conversations: caption, text-to-image, TTS and ASR, two subjects each."""
    rng = random.Random(seed)
    n_img, n_sp = vocab.image_range.size, vocab.speech_range.size
    subjects = ["a red circle on the left", "two blue squares"]
    words = ["hello world", "good morning"]
    images = [Image(tuple(rng.randrange(n_img) for _ in range(image_len)), (4, 4))
              for _ in subjects]
    speech = [Speech(tuple(rng.randrange(n_sp) for _ in range(speech_len)), 12.5)
              for _ in words]

    def chat(user: Sequence[Part], answer: Part) -> list[Message]:
        return [Message("user", tuple(user)), Message("assistant", (answer,))]

    samples = []
    for subject, image in zip(subjects, images):
        samples.append(chat([image, Text("Describe the image.")], Text(subject)))
        samples.append(chat([Text(f"Draw {subject}.")], image))
    for text, audio in zip(words, speech):
        samples.append(chat([Text(f"Say: {text}")], audio))
        samples.append(chat([audio, Text("Transcribe the speech.")], Text(text)))
    return samples


def response_regions(parts: Sequence[Part], tokenizer: TextTokenizer, vocab: Vocab,
                     max_pads: int) -> list[Region]:
    """Regions that fit a known response exactly, with room for the tail pads."""
    regions = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, Image):
            regions.append(Region("image", len(part.codes)))
        elif isinstance(part, Speech):
            # codes, eoa, and (if last) im_end plus the pads
            regions.append(Region("speech", len(part.codes) + 1 + (1 + max_pads if last else 0)))
        else:
            n = len(encode_parts([part], tokenizer, vocab))
            regions.append(Region("text", n + (1 + max_pads if last else 0)))
    return regions


@dataclass(frozen=True)
class FitConfig:
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_pads: int = 4
    pad_ratio: float = 0.6
    weighting: str = "elbo"
    seed: int = 0
    log_every: int = 50


def fit(model: Transformer, samples: Sequence[list[Message]], tokenizer: TextTokenizer,
        vocab: Vocab, config: FitConfig = FitConfig()) -> list[float]:
    """Train on the whole set every step (fresh tail pads and masks each time).

    Returns the loss of every step.
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    encoded = [encode_sample(s, tokenizer, vocab).tensors() for s in samples]
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                            weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / config.steps))
    objective = Objective(pad_ratio=config.pad_ratio, weighting=config.weighting)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(config.steps):
        padded = [add_tail_pad(ids, resp, vocab.pad_id, config.max_pads, gen)
                  for ids, resp in encoded]
        batch = collate(padded, vocab.pad_id)
        loss = diffusion_loss_of_batch(model, batch, vocab, objective, generator=gen).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if config.log_every and (step % config.log_every == 0 or step == config.steps - 1):
            logger.info("step %d loss %.4f (%.1fs)", step, loss.item(), time.perf_counter() - start)
    return losses


def regenerate(model: Transformer, samples: Sequence[list[Message]], tokenizer: TextTokenizer,
               vocab: Vocab, max_pads: int, sampler: SamplerConfig = SamplerConfig()) -> list[list[Part]]:
    """Sample every response from its prompt alone; returns the decoded parts."""
    outputs = []
    for messages in samples:
        prompt = torch.tensor(encode_prompt(messages[:-1], tokenizer, vocab))
        regions = response_regions(messages[-1].parts, tokenizer, vocab, max_pads)
        layout = make_layout(vocab, regions)
        ids = generate(model, prompt[None], layout, sampler)[0]
        outputs.append(decode_response(ids, tokenizer, vocab))
    return outputs


def same_parts(a: Sequence[Part], b: Sequence[Part]) -> bool:
    """Equal content (grid / frame-rate metadata is not generated, so it is ignored)."""
    def key(p: Part) -> tuple:
        return (type(p).__name__, p.text if isinstance(p, Text) else tuple(p.codes))
    return [key(p) for p in a] == [key(p) for p in b]
