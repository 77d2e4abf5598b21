"""The release's text tokenizer and id table, read from its tokenizer files.

The released model's tokenizer is Dream's slow byte-level BPE (`vocab.json` +
`merges.txt`, the Qwen2 pre-tokenizer split, no normalisation) plus the tokens the
authors' code added on top of it, in order: Dream's own specials, 17 image / video /
patch / box / tag tokens, 4 audio specials, 16,384 `<|audio_k|>` speech codes and
8,192 `<|image_k|>` image codes. Their ids are read from the folder's
`tokenizer_config.json` (`added_tokens_decoder`) and `added_tokens.json`, never written
in code, and `ReleaseTokenizer.vocab` turns them into the project's `Vocab`.

The BPE runs on Hugging Face `tokenizers` (the same merges applied the same way as the
slow Python tokenizer). Text is tokenized the way the official code does it: a whole
rendered prompt at once, with added tokens recognised where the template put them.
Text a user wrote goes through `encode_text`, which never turns a string such as
`<|im_start|>` into its special id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omni_model.vocab import REQUIRED_SPECIALS, IdRange, Vocab

#: Dream's (and Qwen2's) pre-tokenizer: contractions, words with one leading symbol,
#: single digits, punctuation runs, newlines, trailing and other whitespace.
PRETOKENIZE_PATTERN = "|".join([
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
    r"[^\r\n\p{L}\p{N}]?\p{L}+",
    r"\p{N}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
ADDED_FILE = "added_tokens.json"

#: code ranges: modality -> the added-token spelling of code k
CODE_TOKENS = {"speech": "<|audio_{}|>", "image": "<|image_{}|>"}

#: vocab special names whose strings differ from `REQUIRED_SPECIALS` in the release
#: (Dream pads with its end-of-text token; the tokenizer config says which)
_CONFIG_SPECIALS = {"pad": "pad_token", "eot": "eos_token", "mask": "mask_token"}

_CODE_PATTERN = re.compile(r"<\|(audio|image)_(\d+)\|>")


class ReleaseFormatError(ValueError):
    """A release folder that cannot be read as the released model's format (the
    message names the file and what is wrong)."""


@dataclass(frozen=True)
class AddedToken:
    id: int
    content: str
    special: bool


class ReleaseTokenizer:
    """Dream's slow BPE plus the release's added tokens (see the module docstring)."""

    def __init__(self, folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]],
                 added: Sequence[AddedToken], config: dict) -> None:
        self.folder = folder
        self.config = config
        self.added = tuple(sorted(added, key=lambda t: t.id))
        self._base_size = len(vocab)
        self._plain = _bpe(vocab, merges)  # no added tokens: text a user wrote
        self._full = _bpe(vocab, merges)   # the official tokenizer: added tokens recognised
        from tokenizers import AddedToken as HFAddedToken

        runs: list[tuple[bool, list]] = []  # consecutive tokens of one kind, added in one call
        for token in self.added:
            if token.content in vocab:
                if vocab[token.content] != token.id:
                    raise ReleaseFormatError(f"{folder}: added token {token.content!r} has id {token.id} "
                                             f"but {VOCAB_FILE} gives it {vocab[token.content]}")
                continue
            if not runs or runs[-1][0] != token.special:
                runs.append((token.special, []))
            runs[-1][1].append(HFAddedToken(token.content, special=token.special, normalized=False))
        for special, specs in runs:  # one at a time would rebuild the matcher 24,000 times
            (self._full.add_special_tokens if special else self._full.add_tokens)(specs)
        for token in self.added:
            got = self._full.token_to_id(token.content)
            if got != token.id:
                raise ReleaseFormatError(f"{folder}: added token {token.content!r} should have id {token.id} "
                                         f"but the ids before it leave it at {got} (ids must be contiguous)")
        self._ids = {t.content: t.id for t in self.added}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder: str | Path) -> "ReleaseTokenizer":
        """Read `vocab.json`, `merges.txt`, `tokenizer_config.json` (and
        `added_tokens.json` when present; the two must agree)."""
        folder = Path(folder)
        for name in (VOCAB_FILE, MERGES_FILE, CONFIG_FILE):
            if not (folder / name).is_file():
                raise ReleaseFormatError(f"{folder}: no {name} (a release folder holds Dream's slow "
                                         f"tokenizer: {VOCAB_FILE}, {MERGES_FILE}, {CONFIG_FILE})")
        vocab = _read_json(folder / VOCAB_FILE)
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ReleaseFormatError(f"{folder / VOCAB_FILE}: expected an object of token -> id")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise ReleaseFormatError(f"{folder / VOCAB_FILE}: ids are not 0..{len(vocab) - 1}")
        merges = _read_merges(folder / MERGES_FILE)
        config = _read_json(folder / CONFIG_FILE)
        added = _added_tokens(folder, config)
        return cls(folder, vocab, merges, added, config)

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer knows (base BPE and added tokens)."""
        return self._full.get_vocab_size(with_added_tokens=True)

    def token_id(self, content: str) -> int:
        """The id of an added token (or of a base token) spelled `content`."""
        i = self._full.token_to_id(content)
        if i is None:
            raise KeyError(f"the release tokenizer has no token {content!r}")
        return i

    def encode(self, text: str) -> list[int]:
        """Tokenize a rendered prompt as the official code does: added tokens (chat
        markers, audio/image specials, `<|audio_k|>`, `<|image_k|>`) become their ids."""
        return self._full.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Tokenize text a user wrote: the BPE alone, so a special's spelling stays text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._full.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def special_string(self, name: str) -> str:
        """The tokenizer config's `pad_token` / `eos_token` / `mask_token` / `bos_token`."""
        value = self.config.get(name)
        if isinstance(value, dict):  # an AddedToken written out
            value = value.get("content")
        if not isinstance(value, str):
            raise ReleaseFormatError(f"{self.folder / CONFIG_FILE}: no {name}")
        return value

    def vocab(self, size: int | None = None) -> Vocab:
        """The release's id table as a `Vocab` (`size`: the model's embedding rows, at
        least every id the tokenizer knows).

        Text is every id below the first code range; the speech and image ranges are the
        contiguous runs of `<|audio_k|>` and `<|image_k|>`; specials are the project's
        required names (pad / end-of-text / mask from the tokenizer config) plus every
        other added special under its own name (`context_of_audio`, `audio`, ...).
        """
        size = self.vocab_size if size is None else size
        if size < self.vocab_size:
            raise ReleaseFormatError(f"the model has {size} embedding rows but its tokenizer "
                                     f"defines {self.vocab_size} ids")
        ranges = {m: self._code_range(m) for m in CODE_TOKENS}
        ranges["text"] = IdRange(0, min(r.start for r in ranges.values()))
        specials, strings = {}, {}
        for name, string in REQUIRED_SPECIALS.items():
            if name in _CONFIG_SPECIALS:
                string = self.special_string(_CONFIG_SPECIALS[name])
            specials[name], strings[name] = self.token_id(string), string
        known = set(strings.values())
        for token in self.added:
            if token.special and token.content not in known and not _CODE_PATTERN.fullmatch(token.content):
                name = token.content.strip("<|>")
                specials.setdefault(name, token.id)
                strings.setdefault(name, token.content)
        try:
            return Vocab(size=size, ranges=ranges, specials=specials, special_tokens=strings)
        except ValueError as e:
            raise ReleaseFormatError(f"{self.folder}: the tokenizer's ids do not form a vocab: {e}") from None

    def _code_range(self, modality: str) -> IdRange:
        spelling = CODE_TOKENS[modality]
        first = self._ids.get(spelling.format(0))
        if first is None:
            raise ReleaseFormatError(f"{self.folder}: no {spelling.format(0)} token (the release's "
                                     f"{modality} codes)")
        n = 0
        while (i := self._ids.get(spelling.format(n))) is not None:
            if i != first + n:
                raise ReleaseFormatError(f"{self.folder}: {spelling.format(n)} has id {i}, not {first + n}: "
                                         f"the {modality} codes are not contiguous")
            n += 1
        return IdRange(first, n)

    # ------------------------------------------------------------------ saving
    def files(self) -> list[Path]:
        """The tokenizer files of the folder it was read from (saved models copy them)."""
        names = [VOCAB_FILE, MERGES_FILE, CONFIG_FILE, ADDED_FILE, "special_tokens_map.json"]
        return [self.folder / n for n in names if (self.folder / n).is_file()]


def _bpe(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReleaseFormatError(f"{path}: not readable JSON ({e})") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if not line or (n == 0 and line.startswith("#version:")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ReleaseFormatError(f"{path}:{n + 1}: a merge is two tokens, got {line[:60]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _added_tokens(folder: Path, config: dict) -> list[AddedToken]:
    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, dict) or not decoder:
        raise ReleaseFormatError(f"{folder / CONFIG_FILE}: no added_tokens_decoder")
    added = []
    for key, entry in decoder.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit()):
            raise ReleaseFormatError(f"{folder / CONFIG_FILE}: bad added token {key!r}: {entry!r}"[:200])
        added.append(AddedToken(int(key), entry["content"], bool(entry.get("special", False))))
    if (folder / ADDED_FILE).is_file():
        listed = _read_json(folder / ADDED_FILE)
        ours = {t.content: t.id for t in added}
        wrong = [c for c, i in listed.items() if ours.get(c) != i]
        if wrong:
            raise ReleaseFormatError(f"{folder}: {ADDED_FILE} and {CONFIG_FILE} disagree on {wrong[:3]}")
    return added
