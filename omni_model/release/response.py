"""A response of the released model, read as the official inference reads it: ids in
the speech range are GLM-4-Voice codes, ids at or above the first image code are image
codes, everything else is text decoded with special tokens skipped, wherever each
appears in the response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from omni_model.release.images import output_codes
from omni_model.release.tokenizer import ReleaseTokenizer
from omni_model.vocab import Vocab


@dataclass(frozen=True)
class ReleaseResponse:
    text: str
    image_codes: list[int] | None   #: 256 codes (16 x 16) ready to decode, or None
    speech_codes: list[int]         #: GLM-4-Voice codes (12.5 a second), maybe empty


def parse_response(ids: Sequence[int], tokenizer: ReleaseTokenizer, vocab: Vocab) -> ReleaseResponse:
    speech, image, text = [], [], []
    s, i = vocab.speech_range, vocab.image_range
    for token in (int(t) for t in ids):
        if s.start <= token < s.stop:
            speech.append(token - s.start)
        elif token >= i.start:
            image.append(token - i.start)
        else:
            text.append(token)
    return ReleaseResponse(tokenizer.decode(text, skip_special_tokens=True), output_codes(image, i.size), speech)
