"""Text tokenizers. Anything with `encode(str) -> list[int]`, `decode(list[int]) -> str`
and `vocab_size` works with `omni_model.templates`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import tokenizers


@runtime_checkable
class TextTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255: no training, no files, lossless on any text.

    Used by the smallest models and tests; real runs use a BPE tokenizer.
    """

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


#: Special-token strings of Qwen/Dream-style tokenizers and the vocab names they map to.
_KNOWN_SPECIALS = {
    "<|endoftext|>": "eot",
    "<|im_start|>": "im_start",
    "<|im_end|>": "im_end",
    "<|mask|>": "mask",
}


class BPETokenizer:
    """A byte-level BPE tokenizer on Hugging Face `tokenizers`.

    Loads any `tokenizer.json` (the real backbone's, e.g. Dream-7B's Qwen2 BPE) or trains
    a small one from a corpus (the embedded default trains on the synthetic world's
    text). Special-token strings that appear in user text are encoded as plain text, so
    a prompt cannot smuggle in a `<|im_start|>`: specials come only from the template.
    """

    FILE = "tokenizer.json"

    def __init__(self, tokenizer: "tokenizers.Tokenizer") -> None:
        self._tok = tokenizer
        self._special_strings = [t.content for t in tokenizer.get_added_tokens_decoder().values()
                                 if t.special]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if any(s in text for s in self._special_strings):
            # Split around special strings and encode those pieces character-wise.
            ids: list[int] = []
            for piece in _split_keep(text, self._special_strings):
                if piece in self._special_strings:
                    ids += [i for ch in piece for i in self._tok.encode(ch, add_special_tokens=False).ids]
                else:
                    ids += self._tok.encode(piece, add_special_tokens=False).ids
            return ids
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def backbone_specials(self) -> dict[str, int]:
        """Vocab names -> ids of the specials this tokenizer already has (for
        `Vocab.extend_backbone`)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        return {name: vocab[s] for s, name in _KNOWN_SPECIALS.items() if s in vocab}

    @property
    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]
        return f"bpe-{digest}"

    @classmethod
    def train(cls, corpus: Iterable[str], vocab_size: int = 2048,
              min_frequency: int = 2) -> "BPETokenizer":
        """Train a byte-level BPE on an iterator of texts (no special tokens: those
        live in the `Vocab`)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / cls.FILE if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no {cls.FILE} at {path}")
        return cls(Tokenizer.from_file(str(file)))

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / self.FILE))
        return path


def _split_keep(text: str, separators: Sequence[str]) -> list[str]:
    import re

    pattern = "(" + "|".join(re.escape(s) for s in sorted(separators, key=len, reverse=True)) + ")"
    return [p for p in re.split(pattern, text) if p]
