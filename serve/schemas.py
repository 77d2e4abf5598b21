"""Request and response bodies of the HTTP API (they are its OpenAPI schema).

    POST /v1/generate
    {"inputs": [{"type": "text", "text": "Draw a red circle on the left."}],
     "outputs": ["image"],
     "sampler": {"steps": 16, "seed": 7}}

Images travel as base64 PNG or JPEG, audio as base64 WAV or FLAC, in both directions.
Field ranges here are the ones any deployment accepts (every number and list has an
upper bound); the deployment's own limits and caps (`serve.yaml`, `limits`) are checked
after, with the same kind of 4xx. The replica validates bodies on its parse threads,
not on its event loop (`Engine.parse_body`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Modality = Literal["text", "image", "speech"]

#: bounds any deployment applies (its `limits` are usually far lower)
MAX_INPUT_PARTS = 64
MAX_POSITIONS = 1_000_000  #: steps, lengths, positions, block lengths, top-k
MAX_TEXT_CHARS = 1_000_000
MAX_DATA_CHARS = 200_000_000


class InputPart(BaseModel):
    """One part of the user turn: text, or a base64 image or audio file."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image", "audio"]
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="the text of a text part")
    data: str | None = Field(None, max_length=MAX_DATA_CHARS,
                             description="base64 PNG/JPEG (image) or WAV/FLAC (audio)")

    @model_validator(mode="after")
    def _has_content(self) -> "InputPart":
        if self.type == "text" and (self.text is None or self.data is not None):
            raise ValueError("a text part needs `text` (and no `data`)")
        if self.type != "text" and (self.data is None or self.text is not None):
            raise ValueError(f"an {self.type} part needs base64 `data` (and no `text`)")
        return self


class SamplerOptions(BaseModel):
    """Options of the masked-diffusion sampler; unset ones take the deployment's defaults."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=1, le=MAX_POSITIONS, description="denoising steps (an upper bound with `threshold`)")
    temperature: float | None = Field(None, ge=0, le=10)
    top_k: int | None = Field(None, ge=1, le=MAX_POSITIONS)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63, description="same seed, same output; "
                             "unset: the server draws one and returns it in `usage`")
    confidence: Literal["probability", "margin", "entropy", "random"] | None = None
    position_penalty: float | None = Field(None, ge=1, le=100)
    position_penalty_start: int | None = Field(None, ge=0, le=MAX_POSITIONS)
    repetition_penalty: float | None = Field(None, ge=1, le=100)
    block_length: int | None = Field(None, ge=1, le=MAX_POSITIONS)
    cfg_scale: float | None = Field(None, ge=0, le=100, description="classifier-free guidance; 0 = off")
    threshold: float | None = Field(None, gt=0, le=1, description="commit every prediction above "
                                    "this confidence in one step (parallel decoding)")
    text_threshold: float | None = Field(None, gt=0, le=1, description="`threshold` for text regions")
    image_threshold: float | None = Field(None, gt=0, le=1, description="`threshold` for image regions")
    speech_threshold: float | None = Field(None, gt=0, le=1, description="`threshold` for speech regions")
    factor: float | None = Field(None, gt=0, le=10, description="Fast-dLLM's factor rule: commit the n "
                                 "most confident positions while the n-th is at least 1 - factor/(n+1)")
    early_stop: bool | None = Field(None, description="fill a text or speech answer's tail with pads "
                                    "once its end is committed")
    cache: Literal["none", "prefix", "dual"] | None = Field(None, description="key-value cache: prefix "
                                                            "(the prompt), dual (all but the current block)")
    cache_refresh: int | None = Field(None, ge=1, le=1024, description="steps between full passes with a cache")


class Lengths(BaseModel):
    """Response positions per output, overriding the length presets."""

    model_config = ConfigDict(extra="forbid")

    text: int | None = Field(None, ge=1, le=MAX_POSITIONS)
    speech: int | None = Field(None, ge=1, le=MAX_POSITIONS)
    spoken: int | None = Field(None, ge=3, le=MAX_POSITIONS, description="a spoken answer: text, boa, speech")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[InputPart] = Field(..., min_length=1, max_length=MAX_INPUT_PARTS,
                                    description="the user turn, in order")
    outputs: list[Modality] = Field(..., min_length=1, max_length=3, description="text, image, speech, or a "
                                    "supported combination: [text, speech], [text, image, speech]")
    sampler: SamplerOptions = Field(default_factory=SamplerOptions)
    lengths: Lengths | None = None


class Usage(BaseModel):
    prompt_tokens: int
    output_tokens: int = Field(..., description="response positions generated")
    steps: int = Field(..., description="sampler forward passes")
    seconds: float = Field(..., description="time from request to response on the replica")
    batch_size: int = Field(..., description="requests that shared its sampler call (batch mode), or the "
                            "most requests it shared a denoising step with (step mode)")
    seed: int


class GenerateResponse(BaseModel):
    model: str
    text: str | None = None
    image: str | None = Field(None, description="base64 PNG")
    speech: str | None = Field(None, description="base64 WAV (16-bit PCM)")
    sample_rate: int | None = None
    speech_codes: list[int] | None = Field(None, description="a release folder's spoken answer as GLM-4-Voice "
                                           "codes (12.5 a second), beside `speech` when the deployment has "
                                           "GLM-4-Voice's decoder")
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    outputs: list[list[Modality]]
    inputs: list[Literal["text", "image", "audio"]]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    error: str


def describe_errors(errors: list[dict[str, Any]]) -> str:
    """Pydantic's validation errors as one message naming each field (the first five)."""
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)
