"""What a replica does with a request when its model is a release folder (the authors'
checkpoint format): the same HTTP API, answered by `ReleaseAnyToAny` with the release's
own prompts and its official sampler.

How it differs from `serve.engine.Engine` (whose checks, limits and responses it keeps):

* a request is one of the release's tasks (`omni_model.release.any_to_any.task_for`);
  options it leaves out take the task's official settings (`preset`), not the
  deployment's `sampler` defaults; every preset must fit the deployment's caps (checked
  when the replica starts);
* request options map onto the official ones: `steps`, `temperature`, `top_p`, `top_k`,
  `confidence` (probability -> maskgit_plus, margin -> topk_margin, entropy -> entropy,
  random -> origin), `repetition_penalty` (the official rule, `entropy-penalty`),
  `position_penalty` (the official ramp past the first 100 masked positions),
  `block_length`, `cfg_scale` (speech-to-image; text-to-image as far as the official
  prompt allows); and onto the project's techniques that apply to the official sampler,
  all off unless asked for (docs/release.md measures what each changes): `threshold`,
  `early_stop`, `cache: prefix` with `cache_refresh` (`speed.PromptCache`). Options
  with no counterpart (per-modality thresholds, `factor`, `position_penalty_start`, the
  dual cache) are refused with a 422 naming them;
* the official sampler takes one request at a time: `batching.mode` must be `batch`, and
  a batch's requests run one after another, each with its own seed, or, with
  `batching.release_shared_steps`, share each step's forward pass (exact up to rounding);
* speech answers come as GLM-4-Voice codes (`speech_codes`) and, with GLM-4-Voice's
  decoder folder (`model.speech_decoder`), as a 22,050 Hz WAV (`speech`, `sample_rate`),
  a batch's answers decoded together; a stream carries progress events without
  previews, then the spoken answer in `audio` events, chunk by chunk as the decoder
  makes them (GLM-4-Voice's streaming schedule: 25 codes first, then 50, 100, 150, 200),
  and its result holds the chunks joined (a chunked rendering differs slightly from the
  one-pass one: docs/speech_decoder.md).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from PIL import Image as PILImage

from omni_model.any_to_any import Audio, Input, Output
from omni_model.release.any_to_any import REQUEST_TASKS, ReleaseAnyToAny
from omni_model.release.sampler import INFERENCE_PRESETS, OfficialSamplerConfig, preset
from serve.config import ServeConfig, over_cap
from serve.engine import OUTPUT_MODALITIES, Engine, Job, requested_lengths
from serve.errors import ClientError, Stopped
from serve.media import encode_wav
from serve.schemas import GenerateRequest, GenerateResponse, ModelCard

logger = logging.getLogger(__name__)

#: request `confidence` -> the official `alg`
ALGORITHMS = {"probability": "maskgit_plus", "margin": "topk_margin", "entropy": "entropy", "random": "origin"}
#: request options the release's sampler has no counterpart for
NOT_OFFICIAL = ("text_threshold", "image_threshold", "speech_threshold", "factor", "position_penalty_start")
#: the prompt cache's refresh interval when a request asks for `cache: prefix` without one
DEFAULT_CACHE_REFRESH = 4


class ReleaseEngine(Engine):
    def __init__(self, cfg: ServeConfig, device: str = "cpu") -> None:  # noqa: super().__init__ loads another kind
        if cfg.batching.mode != "batch":
            raise ValueError("a release folder is served with batching.mode: batch (its official sampler takes "
                             "one request at a time; configs/release/serve.yaml)")
        self.cfg = cfg
        m = cfg.model
        dtype = m.torch_dtype(device)
        self.pipe = ReleaseAnyToAny.from_pretrained(m.model, image_tokenizer=m.image_tokenizer,
                                                    speech_tokenizer=m.speech_tokenizer,
                                                    text_tokenizer=m.text_tokenizer, device=device, dtype=dtype,
                                                    speech_decoder=m.speech_decoder)
        self.pipe.image_resolution = m.release_image_resolution
        self.sampler_calls = self.requests = self.stopped = 0
        self.max_total_tokens = min(cfg.limits.max_total_tokens, self.pipe.max_positions)
        for task in INFERENCE_PRESETS:
            problem = over_cap(official_as_request(preset(task)), cfg.limits)
            if problem or preset(task).max_new_tokens > cfg.limits.max_output_tokens:
                raise ValueError(f"the release's official {task} settings break a cap: "
                                 f"{problem or 'limits.max_output_tokens'} (configs/release/serve.yaml)")
        self._codes_per_image = self._count_image_codes()
        self.scheduler = None

    def _count_image_codes(self) -> int:
        if self.pipe.image_tokenizer is None:
            return 0
        with torch.no_grad():
            return len(self.pipe.model.image_codes(PILImage.new("RGB", (8, 8)), self.pipe.image_tokenizer,
                                                   self.pipe.image_resolution))

    # ------------------------------------------------------------------ model card
    def card(self) -> ModelCard:
        image = self.pipe.image_tokenizer is not None
        # the output combinations of the tasks it can run (without MAGVIT-v2: none with an image)
        combos = {outputs for (outputs, takes_image, _), _task in REQUEST_TASKS.items()
                  if image or not (takes_image or "image" in outputs)}
        outputs = sorted(combos, key=lambda o: [OUTPUT_MODALITIES.index(x) for x in o])
        inputs = ["text"] + (["image"] if image else []) + ["audio"]
        return ModelCard(id=self.cfg.model.name, outputs=[list(o) for o in outputs], inputs=inputs)

    # ------------------------------------------------------------------ requests
    def parse(self, request: GenerateRequest) -> Job:
        """Limits, media, the task, its official settings with the request's options over
        them, the prompt: a `Job`, or a `ClientError`."""
        start = time.perf_counter()
        limits = self.cfg.limits
        inputs = self.decode_inputs(request)
        if "image" in request.outputs and self.pipe.image_tokenizer is None:
            raise ClientError("this deployment cannot draw images: it has no image tokenizer "
                              "(see GET /v1/models)", 422)
        self._check_estimate(inputs, request.outputs, {})
        prepared = self.prepare(inputs, request.outputs, requested_lengths(request))
        config, seed = self.sampler_config(request, prepared.config)
        if request.sampler.cache == "dual":
            raise ClientError("sampler.cache dual: the release's presets decode the response as one block, so "
                              "there is nothing after it to cache; use prefix", 422)
        if request.sampler.cache == "prefix":
            prepared.cache_refresh = request.sampler.cache_refresh or DEFAULT_CACHE_REFRESH
        if config.cfg > 0:
            try:  # the official text-to-image guidance prompt cannot always be built: refuse here
                self.pipe.model.unconditional(config, prepared.prompt, seed)
            except ValueError as exc:
                raise ClientError(f"sampler.cfg_scale: {exc}", 422) from None
        tokens = config.max_new_tokens
        if tokens > limits.max_output_tokens:
            raise ClientError(f"the response would have {tokens} positions, over the limit of "
                              f"{limits.max_output_tokens} (ask for shorter `lengths`)", 413)
        total = prepared.prompt_tokens + tokens
        if total > self.max_total_tokens:
            raise ClientError(f"the prompt ({prepared.prompt_tokens} tokens) and the response ({tokens} "
                              f"positions) make {total}, over the limit of {self.max_total_tokens}", 413)
        return Job(prepared, config, seed, start, start + limits.request_timeout_s)

    def _check_estimate(self, inputs: list[Input], outputs: list[str], lengths: dict[str, int]) -> None:
        """413 when the media alone cannot fit `max_total_tokens`, counted from their
        sizes before any is encoded (an image's codes, an audio's encoder frames, less
        one; never more than `prepare` makes)."""
        prompt = 0
        for x in inputs:
            if isinstance(x, PILImage.Image):
                prompt += self._codes_per_image + 2
            elif isinstance(x, Audio):
                speech = self.pipe.model.speech  # its front end's count, less one frame for resampling
                samples = math.floor(x.seconds * speech.frontend.config.fs)
                prompt += max(0, speech.context_positions(samples) - 1) + 2
        if prompt > self.max_total_tokens:
            raise ClientError(f"the prompt's media alone (at least {prompt} positions, counted from their sizes) "
                              f"make more than the limit of {self.max_total_tokens}", 413)

    def sampler_config(self, request: GenerateRequest,  # type: ignore[override]
                       settings: OfficialSamplerConfig) -> tuple[OfficialSamplerConfig, int]:
        """The request's options over the task's official `settings`, within the caps."""
        given = request.sampler.model_dump(exclude_none=True)
        refused = [k for k in NOT_OFFICIAL if k in given]
        if refused:
            raise ClientError(f"sampler: {', '.join(refused)} is not an option of the released model's "
                              "sampler (steps, temperature, top_p, top_k, confidence, repetition_penalty, "
                              "position_penalty, block_length, cfg_scale, threshold, early_stop, cache "
                              "(none, prefix), cache_refresh, seed)", 422)
        problem = over_cap(given, self.cfg.limits)
        if problem:
            raise ClientError(problem, 422)
        seed = given.pop("seed", None)
        if seed is None:
            seed = secrets.randbelow(2**31)
        changes: dict = {}
        for ours, theirs in (("steps", "steps"), ("temperature", "temperature"), ("top_p", "top_p"),
                             ("top_k", "top_k"), ("position_penalty", "max_position_penalty"),
                             ("block_length", "block_size"), ("cfg_scale", "cfg"), ("threshold", "threshold"),
                             ("early_stop", "early_stop")):
            if ours in given:
                changes[theirs] = given[ours]
        if "confidence" in given:
            changes["alg"] = ALGORITHMS[given["confidence"]]
        if "repetition_penalty" in given:
            alg = changes.get("alg", settings.alg)
            if alg not in ("entropy", "entropy-penalty"):
                raise ClientError("sampler.repetition_penalty: the official sampler applies it with entropy "
                                  f"confidence only, not {alg}", 422)
            changes.update(alg="entropy-penalty", repeat_penalty=given["repetition_penalty"])
        try:
            return replace(settings, **changes), seed
        except ValueError as exc:
            raise ClientError(f"sampler: {exc}", 422) from None

    # ------------------------------------------------------------------ generation
    def run(self, jobs: list[Job]) -> list[GenerateResponse | Exception]:
        """A `@serve.batch` batch: each job in turn (one sampler call each), or, with
        `batching.release_shared_steps`, the wanted jobs in one call sharing each step's
        forward pass."""
        timeout = self.cfg.limits.request_timeout_s
        if self.cfg.batching.release_shared_steps is not None and len(jobs) > 1:
            return self._run_shared(jobs)
        results: list[GenerateResponse | Exception | Output] = []
        for job in jobs:
            if not job.wanted:  # cancelled or timed out while it waited: never started
                results.append(job.refusal(timeout))
                self.stopped += 1
                continue
            try:
                out = self._generate([job], self._stop_unwanted([job]), speak=False)[0]
                results.append(out if job.wanted else job.refusal(timeout))
            except Stopped:
                self.stopped += 1
                results.append(job.refusal(timeout))
            except Exception as exc:  # one request's failure is not the others'
                logger.exception("the official sampler failed for a request")
                results.append(exc)
        answered = [i for i, r in enumerate(results) if isinstance(r, Output)]
        try:  # the batch's spoken answers are decoded together
            self.pipe.speak([results[i] for i in answered])
        except Exception as exc:
            logger.exception("the speech decoder failed for %d requests", len(answered))
            for i in answered:
                results[i] = exc
        return [self.response(job, r, 1) if isinstance(r, Output) else r for job, r in zip(jobs, results)]

    def _run_shared(self, jobs: list[Job]) -> list[GenerateResponse | Exception]:
        timeout = self.cfg.limits.request_timeout_s
        results: list[GenerateResponse | Exception] = [job.refusal(timeout) for job in jobs]
        members = [i for i, job in enumerate(jobs) if job.wanted]
        batch = [jobs[i] for i in members]
        self.stopped += len(jobs) - len(batch)
        if not batch:
            return results
        stop = self._stop_unwanted(batch)
        self.sampler_calls += 1
        self.requests += len(batch)
        try:
            outputs = self.pipe.generate_batch([j.prepared for j in batch], [j.config for j in batch],
                                               seeds=[j.seed for j in batch],
                                               on_step=lambda n: stop(n, None),
                                               shared_steps=self.cfg.batching.release_shared_steps)
        except Stopped:
            self.stopped += len(batch)
            return results
        except Exception as exc:  # the batch's call failed: each of its jobs says so
            logger.exception("a shared sampler call failed for %d requests", len(batch))
            outputs = [exc] * len(batch)
        for i, job, out in zip(members, batch, outputs):
            if isinstance(out, Exception):
                results[i] = out
            else:
                results[i] = self.response(job, out, len(batch)) if job.wanted else job.refusal(timeout)
        return results

    def stream(self, job: Job, emit: Callable[[dict], None],
               emit_audio: Callable[[dict], None] | None = None) -> GenerateResponse:
        """One request with a progress event per forward pass (no previews), then its
        spoken answer chunk by chunk (`emit_audio`) when the deployment can speak."""
        self.refuse_if_unwanted(job)
        most = min(job.config.steps, job.config.max_new_tokens)

        def on_step(done: int, _ids=None) -> None:  # before pass `done` (0-based)
            self.refuse_if_unwanted(job)
            if done:
                emit({"step": done, "max_steps": most})

        chunked = emit_audio is not None and self.pipe.speech_decoder is not None
        out = self._generate([job], on_step, speak=not chunked)[0]
        if chunked and out.speech_codes:
            out.speech, out.sample_rate = self._stream_speech(job, out.speech_codes, emit_audio)
        elif chunked:
            self.pipe.speak([out])
        return self.response(job, out, 1)

    def _stream_speech(self, job: Job, codes: list[int], emit_audio: Callable[[dict], None]):
        """Decode a spoken answer in chunks, sending each as soon as it is made."""
        rate = self.pipe.speech_decoder.sample_rate
        chunks = []
        for i, chunk in enumerate(self.pipe.stream_speech(codes)):
            wave = chunk.numpy()
            chunks.append(wave)
            emit_audio({"index": i, "sample_rate": rate, "samples": len(wave),
                        "speech": encode_wav(wave, rate), "final": False})
            self.refuse_if_unwanted(job)  # the client left, or the deadline passed: decode no more
        emit_audio({"index": len(chunks), "sample_rate": rate, "samples": 0, "speech": None, "final": True})
        return np.concatenate(chunks), rate

    def _generate(self, batch: list[Job], on_step=None, speak: bool = True) -> list[Output]:
        self.sampler_calls += len(batch)
        self.requests += len(batch)
        return self.pipe.generate_batch([j.prepared for j in batch], batch[0].config, seeds=[j.seed for j in batch],
                                        on_step=(lambda n: on_step(n, None)) if on_step is not None else None,
                                        speak=speak)

    def response(self, job: Job, out: Output, batch_size: int) -> GenerateResponse:
        response = super().response(job, out, batch_size)
        return response.model_copy(update={"speech_codes": out.speech_codes})


def official_as_request(config: OfficialSamplerConfig) -> dict:
    """Official settings under the request options' names (to check them against caps)."""
    return {"steps": config.steps, "temperature": config.temperature, "top_p": config.top_p,
            "top_k": config.top_k, "cfg_scale": config.cfg, "repetition_penalty": config.repeat_penalty,
            "position_penalty": config.max_position_penalty,
            "block_length": None if config.block_size < 0 else config.block_size}


__all__ = ["ReleaseEngine", "official_as_request"]
