"""GLM-4-Voice's speech decoder: codes -> 22,050 Hz waveform, in one pass or in chunks.

`GLM4VoiceDecoder.from_folder(path)` loads the released `glm-4-voice-decoder` folder
(`config.yaml`, `flow.pt`, `hift.pt`; the weights with `torch.load(weights_only=True)`)
into this project's own implementation: the flow-matching model (`flow.py`) makes mel
frames, the HiFT vocoder (`hift.py`) makes the waveform. `decode(codes)` is what the
original's `AudioDecoder.token2wav(..., finalize=True)` does with its defaults (no prompt,
a zero speaker vector), for a batch of utterances at once.

Chunked decoding (`stream`, `SpeechStream`) is the original's low-latency mode
(`token2wav` with `finalize=False`, as its web demo and `stream_inference` drive it):
each chunk of codes is decoded with all earlier codes as the flow's prompt and all
earlier mel frames as its prompt frames; the last `mel_overlap` frames of a chunk are held
back and cross-faded (Hamming window) into the next chunk's first frames; the vocoder
re-synthesises the last frame of each chunk at the start of the next, continuing from the
cached NSF source so the excitation has no seam. The audio therefore differs from one
pass (different noise per chunk, the faded frames, the prompt conditioning): it is a
different rendering of the same codes, not a slice of the one-pass waveform. The first
audio is ready after the first chunk instead of after the whole utterance.
"""

from __future__ import annotations

import logging
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from omni_model.tokenizers.glm4voice.config import DecoderConfig, load_decoder_config
from omni_model.tokenizers.glm4voice.flow import MEL_HOP, MEL_SAMPLE_RATE, FlowModel, FlowRequest
from omni_model.tokenizers.glm4voice.hift import HiFTVocoder
from omni_model.tokenizers.speech import SpeechDecoder

log = logging.getLogger(__name__)

#: the web demo's chunk sizes in codes: small first (latency), then larger (quality, speed)
WEB_DEMO_BLOCKS = (25, 50, 100, 150, 200)
#: codes of overlap the original cross-fades between chunks (`token_overlap_len`)
TOKEN_OVERLAP = 5
#: mel frames the vocoder re-synthesises at the start of the next chunk (`mel_cache_len`)
MEL_CACHE = 1


def _load_weights(path: Path) -> dict:
    """A plain state_dict; anything that would need unpickling a class is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler" in line),
                      str(err).splitlines()[0] if str(err) else "")
        raise ValueError(f"{path}: not a plain tensor state_dict; refused to unpickle it ({reason})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict, got {type(state).__name__}")
    return state


class GLM4VoiceDecoder(SpeechDecoder):
    """Speech codes -> waveforms at `sample_rate` (22,050 Hz for the released decoder)."""

    def __init__(self, config: DecoderConfig, flow: FlowModel, hift: HiFTVocoder) -> None:
        self.config = config
        self.flow = flow.eval()
        self.hift = hift.eval()
        self.sample_rate = int(config.hift.sampling_rate)
        self.samples_per_frame = MEL_HOP  # the original's hift cache length, written as 256
        rate = config.flow.input_frame_rate
        self.mel_overlap = int(TOKEN_OVERLAP / rate * MEL_SAMPLE_RATE / MEL_HOP)
        self.window = torch.from_numpy(np.hamming(2 * self.mel_overlap))
        hop = config.hift.samples_per_frame
        if hop != MEL_HOP or self.sample_rate != MEL_SAMPLE_RATE:
            log.warning("decoder vocoder makes %d samples per frame at %d Hz; the flow model sizes "
                        "its frames for %d at %d Hz (as the original does)", hop, self.sample_rate,
                        MEL_HOP, MEL_SAMPLE_RATE)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> "GLM4VoiceDecoder":
        """Load a `glm-4-voice-decoder` folder (weights stay float32 unless `dtype` says)."""
        folder = Path(folder)
        for name in ("config.yaml", "flow.pt", "hift.pt"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name} (a GLM-4-Voice decoder folder "
                                        "holds config.yaml, flow.pt and hift.pt)")
        config = load_decoder_config(folder)
        flow = FlowModel(config.flow)
        missing, unexpected = flow.load_state_dict(_load_weights(folder / "flow.pt"), strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / 'flow.pt'} does not fit config.yaml's flow model: "
                             f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
        hift = HiFTVocoder(config.hift)
        hift.load_original(_load_weights(folder / "hift.pt"))
        return cls(config, flow.to(device, dtype), hift.to(device, dtype))

    @property
    def device(self) -> torch.device:
        return next(self.flow.parameters()).device

    # ------------------------------------------------------------------ one pass
    @torch.inference_mode()
    def decode(self, codes: Sequence[torch.Tensor], steps: int | None = None,
               batch_size: int | None = None) -> list[torch.Tensor]:
        """Codes (1-D, any int dtype) -> one float32 CPU waveform each, at `sample_rate`.
        `steps`: flow-matching steps (default 10, the official setting); `batch_size`:
        see `decode_with_mel`."""
        return [w for w, _ in self.decode_with_mel(codes, steps, batch_size)]

    def default_batch_size(self) -> int:
        """Utterances decoded together: all on a GPU; one at a time on a CPU, where a batch
        only adds padding (benchmarks/glm4voice_decoder.py: 16 a batch took 1.3x as long
        as one by one on 2 cores; the arithmetic, not the call overhead, is the cost)."""
        return 1 << 30 if self.device.type == "cuda" else 1

    @torch.inference_mode()
    def decode_with_mel(self, codes: Sequence[torch.Tensor], steps: int | None = None,
                        batch_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(waveform [S], mel [80, T]) per utterance, as `token2wav(finalize=True)` returns.
        Utterances go through in batches of `batch_size` (default `default_batch_size()`),
        grouped by length to keep padding small; the results do not depend on it."""
        codes = [torch.as_tensor(c).reshape(-1) for c in codes]
        size = max(1, batch_size or self.default_batch_size())
        order = sorted(range(len(codes)), key=lambda i: len(codes[i]))
        results: list = [None] * len(codes)
        for start in range(0, len(order), size):
            members = order[start:start + size]
            for i, pair in zip(members, self._decode_batch([codes[i] for i in members], steps)):
                results[i] = pair
        return results

    def _decode_batch(self, codes: list[torch.Tensor], steps: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mels, generators = self.flow.mel_frames([FlowRequest(c) for c in codes], steps=steps)
        waves: list[torch.Tensor | None] = [None] * len(mels)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, mel in enumerate(mels):  # the vocoder batches utterances of equal length
            groups[mel.shape[-1]].append(i)
        for members in groups.values():
            speech, _ = self.hift.inference(torch.stack([mels[i] for i in members]),
                                            [generators[i] for i in members])
            for row, i in enumerate(members):
                waves[i] = speech[row].float().cpu()
        return [(w, m.float().cpu()) for w, m in zip(waves, mels)]

    # ------------------------------------------------------------------ chunked
    def start_stream(self) -> "SpeechStream":
        """A stream for one utterance: `push(codes, final)` returns each chunk's audio."""
        return SpeechStream(self)

    def stream(self, codes: torch.Tensor, blocks: Sequence[int] = WEB_DEMO_BLOCKS) -> Iterator[torch.Tensor]:
        """Decode one utterance chunk by chunk: the i-th chunk takes `blocks[i]` codes (the
        last size repeats); yields each chunk's audio as soon as it is made."""
        codes = torch.as_tensor(codes).reshape(-1)
        if codes.numel() == 0:
            raise ValueError("no speech codes to decode")
        stream = self.start_stream()
        start, i = 0, 0
        while start < len(codes):
            size = int(blocks[min(i, len(blocks) - 1)])
            if size < 1:
                raise ValueError(f"chunk sizes must be positive, got {size}")
            end = min(start + size, len(codes))
            yield stream.push(codes[start:end], final=end == len(codes))
            start, i = end, i + 1


@dataclass
class SpeechStream:
    """The state `AudioDecoder` keeps per utterance id between `token2wav` calls."""

    decoder: GLM4VoiceDecoder
    prompt_codes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    mels: list[torch.Tensor] = field(default_factory=list)
    overlap: torch.Tensor | None = None
    cache_mel: torch.Tensor | None = None
    cache_source: torch.Tensor | None = None
    finished: bool = False

    @torch.inference_mode()
    def push(self, codes: torch.Tensor, final: bool = False) -> torch.Tensor:
        """The next chunk of codes -> its audio (float32, CPU). `final` flushes the rest."""
        if self.finished:
            raise RuntimeError("this speech stream is finished")
        d = self.decoder
        codes = torch.as_tensor(codes).reshape(-1).long()
        prompt_mel = torch.cat(self.mels, dim=-1).T if self.mels else None
        (mel,), (generator,) = d.flow.mel_frames([FlowRequest(codes, self.prompt_codes, prompt_mel)])
        mel = mel.unsqueeze(0)
        if self.overlap is not None:
            n = d.mel_overlap
            if mel.shape[-1] < n:
                raise ValueError(f"a chunk gave {mel.shape[-1]} mel frames, fewer than the "
                                 f"{n} to cross-fade: use larger chunks")
            window = d.window.to(mel.device)
            faded = mel[..., :n].double() * window[:n] + self.overlap[..., -n:].double() * window[n:]
            mel = mel.clone()
            mel[..., :n] = faded.to(mel.dtype)  # the original fades in float64 (numpy window)
        cache = None
        if self.cache_mel is not None:
            mel = torch.cat([self.cache_mel, mel], dim=2)
            cache = self.cache_source
        if final:
            speech, _ = d.hift.inference(mel, [generator], cache_source=cache)
            self.finished = True
        else:
            if mel.shape[-1] < d.mel_overlap + 2:
                raise ValueError(f"a chunk of {len(codes)} codes gave {mel.shape[-1]} mel frames; a chunk "
                                 f"before the last needs more than the {d.mel_overlap} it holds back to "
                                 f"cross-fade (at 12.5 codes a second: at least 6 codes)")
            self.overlap = mel[:, :, -d.mel_overlap:]
            mel = mel[:, :, : -d.mel_overlap]
            speech, source = d.hift.inference(mel, [generator], cache_source=cache)
            self.cache_mel = mel[:, :, -MEL_CACHE:]
            self.cache_source = source[:, :, -MEL_CACHE * d.samples_per_frame:]
            speech = speech[:, : -MEL_CACHE * d.samples_per_frame]
        self.mels.append(mel[0])
        self.prompt_codes = torch.cat([self.prompt_codes, codes.to(self.prompt_codes.device)])
        return speech[0].float().cpu()
