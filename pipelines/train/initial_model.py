"""Where a stage starts: its vocab and its first weights (a fresh tiny model, a
Dream-layout backbone whose vocab gains the image and speech codes, or an earlier
stage's checkpoint)."""

from __future__ import annotations

from pathlib import Path

from omni_model.tokenizers.text import BPETokenizer, ByteTokenizer
from omni_model.transformer import Transformer, TransformerConfig
from omni_model.vocab_resize import resize_vocab
from omni_model.vocab import Vocab
from pipelines.train.checkpoint import resolve_previous
from pipelines.train.config import StageConfig


def load_text_tokenizer(path: str | None):
    return BPETokenizer.from_pretrained(path) if path else ByteTokenizer()


def resolve_vocab(cfg: StageConfig, identity: dict) -> tuple[Vocab, str | None]:
    """The stage's vocab and the weights to start from (None: fresh)."""
    m = cfg.model
    image = (identity.get("image") or {}).get("codebook_size")
    speech = (identity.get("speech") or {}).get("codebook_size")
    if m.init == "previous":
        if not m.path:
            raise ValueError("model.init=previous needs model.path (a folder or latest:RUN_DIR)")
        folder = resolve_previous(m.path)
        vocab = Vocab.load(folder)
        for name, n in (("image", image), ("speech", speech)):
            if n and vocab.ranges[name].size != n:
                raise ValueError(f"{folder}'s vocab has {vocab.ranges[name].size} {name} codes, "
                                 f"the shards' tokenizer {n}")
        return vocab, str(folder)
    if m.init == "pretrained":
        if not m.path:
            raise ValueError("model.init=pretrained needs model.path (a Dream-layout folder)")
        tok = BPETokenizer.from_pretrained(m.path)
        vocab = Vocab.extend_backbone(tok.vocab_size, tok.backbone_specials(), image or 8192,
                                      speech or 16384, code_order=("speech", "image"))
        return vocab, m.path
    if m.init != "fresh":
        raise ValueError(f"unknown model.init {m.init!r}")
    text = load_text_tokenizer(cfg.data.text_tokenizer)
    return Vocab.fresh(text.vocab_size, image or 1, speech or 1), None


def build_model(cfg: StageConfig, vocab: Vocab, init_path: str | None,
                 resume: Path | None) -> Transformer:
    if resume is not None:
        return Transformer.from_pretrained(resume)
    if init_path is not None:
        model = Transformer.from_pretrained(init_path, shift_logits=cfg.model.shift_logits)
        if model.config.vocab_size != vocab.size:
            resize_vocab(model, vocab.size)  # a backbone gains the image and speech codes
        model.config = model.config.replace(mask_token_id=vocab.mask_id, pad_token_id=vocab.pad_id)
        return model
    f = cfg.model.fresh
    config = TransformerConfig(vocab_size=vocab.size, hidden_size=f.hidden, intermediate_size=f.ffn,
                               num_hidden_layers=f.layers, num_attention_heads=f.heads,
                               num_key_value_heads=f.kv_heads, rope_theta=f.rope_theta,
                               max_position_embeddings=f.max_position_embeddings,
                               shift_logits=cfg.model.shift_logits, mask_token_id=vocab.mask_id,
                               pad_token_id=vocab.pad_id, image_position_embeddings=f.image_positions,
                               image_start_token_id=vocab.boi_id, image_end_token_id=vocab.eoi_id)
    return Transformer.from_config(config, seed=cfg.data.seed)
