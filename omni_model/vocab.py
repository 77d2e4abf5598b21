"""The unified token space: text ids, special tokens, image codes and speech codes.

Every token id in the project comes from a `Vocab`; no module writes an integer id
literal. A `Vocab` is saved as `vocab.json` beside every checkpoint and shard set, so the
offsets of each range live in data, never in code. Two layouts must be expressible:

* the fresh one of the tiny embedded models: text, then specials, then image codes,
  then speech codes (`Vocab.fresh`);
* one built on top of an existing backbone's text vocabulary, reusing the backbone's own
  mask / end-of-text / chat ids and appending everything else (`Vocab.extend_backbone`).
  The published Omni-Diffusion checkpoint appends 21 specials, then the speech codes
  (151,688..168,071), then the image codes (168,072..176,263); the order of the code
  ranges is a parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from omni_model.model_folder import VOCAB_FILE

MODALITIES = ("text", "image", "speech")

#: Specials every vocab has, with the strings they render as in templates.
REQUIRED_SPECIALS: dict[str, str] = {
    "mask": "<|mask|>",
    "pad": "<|pad|>",  # the tail pad that ends a response
    "eot": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "boi": "<|begin_of_image|>",
    "eoi": "<|end_of_image|>",
    "boa": "<|begin_of_audio|>",
    "eoa": "<|end_of_audio|>",
}

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class IdRange:
    """A half-open range of global ids `[start, start + size)`."""

    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size

    def __contains__(self, token_id: object) -> bool:
        return isinstance(token_id, int) and self.start <= token_id < self.stop

    def overlaps(self, other: "IdRange") -> bool:
        return self.start < other.stop and other.start < self.stop


@dataclass(frozen=True)
class Vocab:
    """The id layout of one model.

    Attributes:
        size: total number of ids (the model's embedding rows).
        ranges: `text`, `image` and `speech` id ranges. The text range may contain
            backbone special ids (a real BPE vocabulary interleaves them); `specials`
            names the ones the project uses.
        specials: special name -> id. Several names may share an id (Dream uses its
            end-of-text id as the pad).
        special_tokens: special name -> the string it renders as.
    """

    size: int
    ranges: Mapping[str, IdRange]
    specials: Mapping[str, int]
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [m for m in MODALITIES if m not in self.ranges]
        if missing:
            raise ValueError(f"vocab lacks ranges for {missing}")
        for name in REQUIRED_SPECIALS:
            if name not in self.specials:
                raise ValueError(f"vocab lacks the special token {name!r}")
        for m in MODALITIES:
            r = self.ranges[m]
            if r.size <= 0 or r.start < 0 or r.stop > self.size:
                raise ValueError(f"{m} range {r} does not fit in a vocab of {self.size}")
        image, speech, text = (self.ranges[m] for m in ("image", "speech", "text"))
        if image.overlaps(speech) or image.overlaps(text) or speech.overlaps(text):
            raise ValueError(f"modality ranges overlap: {dict(self.ranges)}")
        for name, i in self.specials.items():
            if not 0 <= i < self.size:
                raise ValueError(f"special {name!r}={i} outside the vocab of {self.size}")
            if i in image or i in speech:
                raise ValueError(f"special {name!r}={i} falls inside a code range")

    # ------------------------------------------------------------------ construction
    @classmethod
    def fresh(cls, text_size: int, image_codes: int, speech_codes: int,
              extra_specials: Sequence[str] = ()) -> "Vocab":
        """Text ids `0..text_size-1`, then the specials, then image, then speech codes."""
        tokens = dict(REQUIRED_SPECIALS)
        for name in extra_specials:
            tokens.setdefault(name, f"<|{name}|>")
        specials = {name: text_size + i for i, name in enumerate(tokens)}
        image_start = text_size + len(tokens)
        speech_start = image_start + image_codes
        return cls(
            size=speech_start + speech_codes,
            ranges={"text": IdRange(0, text_size), "image": IdRange(image_start, image_codes),
                    "speech": IdRange(speech_start, speech_codes)},
            specials=specials,
            special_tokens=tokens,
        )

    @classmethod
    def extend_backbone(cls, backbone_size: int, backbone_specials: Mapping[str, int],
                        image_codes: int, speech_codes: int,
                        code_order: Sequence[str] = ("image", "speech"),
                        extra_specials: Sequence[str] = (),
                        text_size: int | None = None) -> "Vocab":
        """A vocab on top of a pretrained backbone's text vocabulary.

        Args:
            backbone_size: number of ids the backbone's tokenizer defines (its regular
                tokens and its own specials); new ids are appended after it.
            backbone_specials: the backbone's ids for our specials where it has them,
                e.g. Dream's `{"mask": 151666, "eot": 151643, "pad": 151643,
                "im_start": 151644, "im_end": 151645}`. Every other required special
                (and every name in `extra_specials`) gets a new id after the backbone.
            code_order: which code range comes first after the appended specials;
                the published checkpoint uses `("speech", "image")`.
            extra_specials: further names to append (the published checkpoint appends
                21 specials in all, so its speech codes start at 151,688).
            text_size: the size of the text range, by default `backbone_size`.
        """
        if sorted(code_order) != ["image", "speech"]:
            raise ValueError(f"code_order must order 'image' and 'speech', got {code_order}")
        specials = dict(backbone_specials)
        tokens = {n: REQUIRED_SPECIALS.get(n, f"<|{n}|>") for n in specials}
        next_id = backbone_size
        for name in [*REQUIRED_SPECIALS, *extra_specials]:
            if name not in specials:
                specials[name] = next_id
                tokens[name] = REQUIRED_SPECIALS.get(name, f"<|{name}|>")
                next_id += 1
        sizes = {"image": image_codes, "speech": speech_codes}
        ranges = {"text": IdRange(0, backbone_size if text_size is None else text_size)}
        for modality in code_order:
            ranges[modality] = IdRange(next_id, sizes[modality])
            next_id += sizes[modality]
        return cls(size=next_id, ranges=ranges, specials=specials, special_tokens=tokens)

    # ------------------------------------------------------------------ accessors
    def __getattr__(self, name: str) -> int:
        # `vocab.mask_id`, `vocab.boa_id`, ...: the one way code asks for a special id.
        if name.endswith("_id") and not name.startswith("_"):
            specials = object.__getattribute__(self, "specials")
            key = name[:-3]
            if key in specials:
                return specials[key]
        raise AttributeError(name)

    @property
    def text_range(self) -> IdRange:
        return self.ranges["text"]

    @property
    def image_range(self) -> IdRange:
        return self.ranges["image"]

    @property
    def speech_range(self) -> IdRange:
        return self.ranges["speech"]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.specials.values())

    def special(self, name: str) -> int:
        """The id of special `name` (raises KeyError with the known names)."""
        try:
            return self.specials[name]
        except KeyError:
            raise KeyError(f"no special {name!r}; known: {sorted(self.specials)}") from None

    def modality_of(self, token_id: int) -> str | None:
        """`text`, `image`, `speech`, `special` or None (an id outside every range)."""
        if token_id in self.special_ids:
            return "special"
        for m in MODALITIES:
            if token_id in self.ranges[m]:
                return m
        return None

    # ------------------------------------------------------------------ conversions
    def to_global(self, modality: str, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Local codes of an image/speech tokenizer (0..n-1) -> global ids."""
        r = self._code_range(modality)
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.numel() and (codes.min() < 0 or codes.max() >= r.size):
            raise ValueError(f"{modality} codes must lie in [0, {r.size}); got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return codes + r.start

    def to_local(self, modality: str, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Global ids -> local codes of the image/speech tokenizer."""
        r = self._code_range(modality)
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and (ids.min() < r.start or ids.max() >= r.stop):
            raise ValueError(f"ids outside the {modality} range [{r.start}, {r.stop})")
        return ids - r.start

    def image_to_ids(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.to_global("image", codes)

    def ids_to_image(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.to_local("image", ids)

    def speech_to_ids(self, codes: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.to_global("speech", codes)

    def ids_to_speech(self, ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.to_local("speech", ids)

    def allowed_mask(self, modality: str, extra: Iterable[str] = ()) -> torch.Tensor:
        """Boolean `[size]`: ids a region of `modality` may hold, plus named specials.

        For `text` the backbone's own specials inside the text range are excluded, so
        a text region never emits a mask or chat token unless `extra` names it.
        """
        allowed = torch.zeros(self.size, dtype=torch.bool)
        r = self.ranges[modality]
        allowed[r.start:r.stop] = True
        if modality == "text":
            allowed[list(self.special_ids)] = False
        for name in extra:
            allowed[self.special(name)] = True
        return allowed

    def _code_range(self, modality: str) -> IdRange:
        if modality not in ("image", "speech"):
            raise ValueError(f"no code range for modality {modality!r}")
        return self.ranges[modality]

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {
            "format_version": _FORMAT_VERSION,
            "size": self.size,
            "ranges": {m: {"start": r.start, "size": r.size} for m, r in self.ranges.items()},
            "specials": dict(self.specials),
            "special_tokens": dict(self.special_tokens),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Vocab":
        version = data.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported vocab format_version {version!r}")
        return cls(
            size=int(data["size"]),
            ranges={m: IdRange(int(r["start"]), int(r["size"])) for m, r in data["ranges"].items()},
            specials={k: int(v) for k, v in data["specials"].items()},
            special_tokens=dict(data.get("special_tokens", {})),
        )

    def save(self, path: str | Path) -> Path:
        """Write `vocab.json` (into `path` if it is a folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        """Read a `vocab.json` (or the one inside folder `path`)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        return cls.from_dict(json.loads(path.read_text()))
