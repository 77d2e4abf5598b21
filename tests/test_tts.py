"""TTS engines: real audio of plausible duration, deterministic, intelligible."""

import numpy as np
import pytest

from pipelines.world.tts import Synthesize, get_engine

TEXT = "a large red circle on the left"


@pytest.mark.parametrize("engine", ["espeak", "hibari", "piper-joe"])
def test_engines_speak_plausible_audio(engine):
    tts = get_engine(engine)
    audio = tts.synthesize(TEXT, seed=3)
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = len(audio) / 16000
    assert 0.8 < seconds < 4.0  # 7 words at 2-8 words a second
    assert 0.01 < np.abs(audio).max() <= 1.0 and np.sqrt(np.mean(audio ** 2)) > 1e-3
    assert np.array_equal(audio, tts.synthesize(TEXT, seed=3))
    longer = tts.synthesize(TEXT + " and two blue squares at the top", seed=3)
    assert len(longer) > 1.4 * len(audio)


def test_espeak_voices_speeds_and_errors():
    tts = get_engine("espeak")
    slow = tts.synthesize(TEXT, "en-gb+m3", speed=0.7)
    fast = tts.synthesize(TEXT, "en-gb+m3", speed=1.4)
    assert len(slow) > 1.5 * len(fast)
    assert not np.array_equal(tts.synthesize(TEXT, "en-us+f3")[:8000], tts.synthesize(TEXT, "en-us+m1")[:8000])
    with pytest.raises(ValueError, match="empty"):
        tts.synthesize("   ")
    with pytest.raises(ValueError, match="unknown TTS engine"):
        get_engine("nope")


def test_engine_speech_is_recognised():
    from omni_model.metrics import word_error_rate
    from pipelines.evaluation.asr import WhisperRecognizer

    asr = WhisperRecognizer()
    audio = get_engine("hibari").synthesize(TEXT)
    heard = asr.transcribe(audio, 16000)
    assert word_error_rate([TEXT], [heard]) <= 0.15
    # Whisper runs in a child process (its OpenMP runtime slows this process's torch) and
    # hears there exactly what it hears in this process
    import os

    assert asr.pid != os.getpid()
    here = WhisperRecognizer(isolated=False)
    assert here.pid == os.getpid() and here.transcribe(audio, 16000) == heard
    asr.close()
    with pytest.raises(FileNotFoundError, match="no Whisper model"):
        WhisperRecognizer(model_path="/nonexistent/whisper")


def test_synthesize_stage_writes_wavs_once(tmp_path):
    import soundfile as sf

    stage = Synthesize("espeak", str(tmp_path))
    batch = {"text": np.array([TEXT, "yes"], dtype=object), "voice": np.array(["", "en-us+f3"], dtype=object),
             "speed": np.array([1.0, 1.0]), "seed": np.array([0, 1]),
             "path": np.array(["a/one.wav", "a/two.wav"], dtype=object)}
    out = stage(batch)
    assert (tmp_path / "a/one.wav").exists() and out["seconds"][0] > out["seconds"][1] > 0
    assert sf.info(tmp_path / "a/one.wav").samplerate == 16000
    mtime = (tmp_path / "a/one.wav").stat().st_mtime_ns
    stage(batch)
    assert (tmp_path / "a/one.wav").stat().st_mtime_ns == mtime  # not re-synthesised
