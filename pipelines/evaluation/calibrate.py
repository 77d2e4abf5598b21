"""Response lengths measured on the training shards: the answers the model learned."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from omni_model.any_to_any import LengthPresets


def calibrate_presets(shard_sets: Sequence[str], tokenizer, base: LengthPresets = LengthPresets(),
                      codes_per_second: float = 12.5, quantile: float = 0.9) -> LengthPresets:
    """TTS: speech codes (+ eoa, im_end) per token of the input text; ASR: answer tokens
    (+ im_end) per second of input speech; text: the longest caption/VQA answer (+ im_end);
    spoken answers: their whole length and where `boa` sits in it. Each at `quantile`,
    so most answers fit and the rest of a region fills with the pads the model learned.
    """
    import pyarrow.parquet as pq

    from pipelines.data.shards import shard_files

    def n_text(parts) -> int:
        return sum(len(tokenizer.encode(p["text"])) for p in parts if p["type"] == "text")

    def n_codes(parts, kind: str) -> int:
        return sum(len(p["codes"]) for p in parts if p["type"] == kind)

    tts, asr, text, spoken, boa = [], [], [], [], []
    for root in shard_sets:
        for f in shard_files(root) if Path(root).exists() else []:
            for row in pq.read_table(f, columns=["task", "messages"]).to_pylist():
                user, answer = row["messages"][0]["parts"], row["messages"][-1]["parts"]
                if row["task"] == "tts" and n_text(user):
                    tts.append((n_codes(answer, "speech") + 2) / n_text(user))
                elif row["task"] == "asr" and n_codes(user, "speech"):
                    asr.append((n_text(answer) + 1) / (n_codes(user, "speech") / codes_per_second))
                elif row["task"] in ("caption", "vqa"):
                    text.append(n_text(answer) + 1)
                elif row["task"] == "svqa":
                    spoken.append(n_text(answer) + 1 + n_codes(answer, "speech") + 2)
                    boa.append(n_text(answer) / spoken[-1])
    q = lambda xs: float(np.quantile(xs, quantile))
    return replace(
        base,
        tts_codes_per_token=round(q(tts), 3) if tts else base.tts_codes_per_token,
        asr_tokens_per_second=round(q(asr), 3) if asr else base.asr_tokens_per_second,
        text=int(np.ceil(q(text))) + 1 if text else base.text,
        spoken=int(np.ceil(q(spoken))) if spoken else base.spoken,
        boa_fraction=round(float(np.median(boa)), 3) if boa else base.boa_fraction)
