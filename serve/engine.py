"""What a replica does with a request, without Ray: check it against the limits, decode
its media, prepare it (`AnyToAny.prepare`), run batches of prepared requests through the
sampler, and turn outputs into response bodies.

A batch from `@serve.batch` may mix requests; `run` groups those whose layout and
sampler options (the seed aside) are equal (`omni_model.any_to_any.batch_key`, the grouping
the evaluation uses too) and makes one sampler call per group. Every
request keeps its own seed (per-row generators in the sampler), so its result does not
depend on what it was batched with.

In step mode (`batching.mode: step`) jobs go to a `StepScheduler` instead (`ticket`):
one denoising step at a time over every active job, whatever its layout.

A body is parsed and checked on the replica's parse threads, not its event loop
(`parse_body`): list lengths before the items are validated, the prompt's tokens
estimated (at least) from its text and media sizes before any medium is tokenized,
sampler options within the deployment's caps (`limits`).

Every job carries a deadline (`limits.request_timeout_s` from its arrival) and a cancel
flag (set when its client goes away). A job past either is not started; a sampler call
stops at the next step once none of its jobs is still wanted. A job past its deadline
answers 504.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image as PILImage
from pydantic import ValidationError
from pydantic_core import from_json

from omni_model.any_to_any import OUTPUTS, AnyToAny, Audio, Input, Output, Prepared, RequestError, batch_key, batches
from omni_model.sampler import Layout, SamplerConfig
from omni_model.templates import Message, encode_prompt
from serve.config import ServeConfig, over_cap, within_caps
from serve.errors import ClientError, Stopped
from serve.media import decode_audio, decode_image, encode_png, encode_wav
from serve.scheduler import StepScheduler, Ticket
from serve.schemas import GenerateRequest, GenerateResponse, ModelCard, Usage, describe_errors
from serve.threads import single_threaded_pool

logger = logging.getLogger(__name__)

OUTPUT_MODALITIES = ("text", "image", "speech")


@dataclass
class Job:
    """A checked, prepared request."""

    prepared: Prepared
    config: SamplerConfig
    seed: int
    start: float
    deadline: float = float("inf")  #: perf_counter time after which it answers 504
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def wanted(self) -> bool:
        return not self.cancelled.is_set() and time.perf_counter() < self.deadline

    def refusal(self, timeout_s: float) -> Exception:
        """Why an unwanted job has no result."""
        if self.cancelled.is_set():
            return Stopped("the client went away")
        return ClientError(f"the request took longer than the limit of {timeout_s:g} s "
                           "(limits.request_timeout_s)", 504)


def requested_lengths(request: GenerateRequest) -> dict[str, int]:
    """The response lengths a request sets (`lengths`, unset ones left out)."""
    return {k: v for k, v in (request.lengths.model_dump() if request.lengths else {}).items() if v is not None}


class Engine:
    def __init__(self, cfg: ServeConfig, device: str = "cpu") -> None:
        self.cfg = cfg
        m = cfg.model
        self.pipe = AnyToAny.from_pretrained(m.model, image_tokenizer=m.image_tokenizer,
                                             speech_tokenizer=m.speech_tokenizer,
                                             text_tokenizer=m.text_tokenizer, device=device,
                                             speech_decoder=m.speech_decoder, dtype=m.torch_dtype(device))
        if m.vocoder_iterations is not None and hasattr(self.pipe.speech_codec, "griffin_lim_iterations"):
            self.pipe.speech_codec.griffin_lim_iterations = m.vocoder_iterations
        self.sampler_calls = 0
        self.requests = 0
        self.stopped = 0  #: jobs dropped or stopped because they were no longer wanted
        #: prompt + response positions a request may have: the limit, within the model's
        self.max_total_tokens = min(cfg.limits.max_total_tokens,
                                    self.pipe.model.config.max_position_embeddings)
        for kind, options in self.pipe.presets.sampler.items():
            problem = over_cap(options, cfg.limits)
            if problem:  # every request of that kind would be refused: say so at start instead
                raise ValueError(f"the model's presets.json ({kind}) break a cap: {problem}")
        #: prompt tokens of an empty user turn (the chat template's own)
        self._template_tokens = len(encode_prompt([Message("user", ())], self.pipe.text_tokenizer, self.pipe.vocab))
        self._codes_per_image = self._count_image_codes()
        self.scheduler = StepScheduler(self.pipe, cfg.batching.max_rows, cfg.batching.max_padding,
                                       threads=cfg.deployment.threads) if cfg.batching.mode == "step" else None
        #: a stream's progress events, previews and result, in order, off the scheduler's
        #: thread (a slow preview delays that stream's events, never anyone's steps)
        self._events = single_threaded_pool(1, "events")

    @property
    def healthy(self) -> bool:
        """The replica can generate: in step mode, its scheduler's loop is running."""
        return self.scheduler is None or self.scheduler.alive

    def _count_image_codes(self) -> int:
        """Codes an input image becomes (the tokenizer resizes every image to its own
        resolution), measured once; 0 without an image tokenizer."""
        if self.pipe.image_tokenizer is None:
            return 0
        with torch.no_grad():
            return int(self.pipe.image_tokenizer.encode([PILImage.new("RGB", (8, 8))]).shape[-1])

    def stats(self) -> dict:
        """Counters for `GET /v1/stats`."""
        stats = {"mode": self.cfg.batching.mode, "requests": self.requests, "stopped": self.stopped}
        if self.scheduler is None:
            return {**stats, "sampler_calls": self.sampler_calls}
        s = self.scheduler
        return {**stats, "stopped": self.stopped + s.stopped, "failed": s.failed, "steps": s.steps,
                "forward_passes": s.forward_passes, "rows_per_step": round(s.rows_stepped / max(1, s.steps), 2),
                "in_flight": s.in_flight}

    @property
    def _speaks(self) -> bool:
        return self.pipe.speech_codec is not None and self.pipe.speech_codec.can_decode

    # ------------------------------------------------------------------ model card
    def card(self) -> ModelCard:
        outputs = [list(k) for k in OUTPUTS
                   if ("image" not in k or self.pipe.image_tokenizer is not None)
                   and ("speech" not in k or self._speaks)]
        inputs = ["text"] + (["image"] if self.pipe.image_tokenizer is not None else []) \
            + (["audio"] if self.pipe.speech_codec is not None else [])
        return ModelCard(id=self.cfg.model.name, outputs=outputs, inputs=inputs)

    # ------------------------------------------------------------------ requests
    def parse_body(self, raw: bytes) -> Job:
        """An HTTP body -> a `Job`, or a `ClientError`: JSON (400), list lengths before
        any item is validated (a body of 8 MB holds 500,000 tiny parts), the schema (422),
        then `parse`."""
        try:
            body = from_json(raw)
        except ValueError:
            raise ClientError("the body is not valid JSON", 400) from None
        if isinstance(body, dict):
            inputs, outputs = body.get("inputs"), body.get("outputs")
            if isinstance(inputs, list) and len(inputs) > self.cfg.limits.max_inputs:
                raise ClientError(f"{len(inputs)} input parts, over the limit of {self.cfg.limits.max_inputs}", 413)
            if isinstance(outputs, list) and len(outputs) > len(OUTPUT_MODALITIES):
                raise ClientError(f"outputs: {len(outputs)} items; at most {len(OUTPUT_MODALITIES)} "
                                  f"({', '.join(OUTPUT_MODALITIES)}), each once", 422)
        try:
            request = GenerateRequest.model_validate(body)
        except ValidationError as exc:
            raise ClientError(describe_errors(exc.errors()), 422) from None
        return self.parse(request)

    def parse(self, request: GenerateRequest) -> Job:
        """Limits, media, sampler options and the prompt: a `Job`, or a `ClientError`."""
        start = time.perf_counter()
        limits = self.cfg.limits
        inputs = self.decode_inputs(request)
        if "speech" in request.outputs and not self._speaks:
            raise ClientError("this deployment cannot produce speech: its speech tokenizer has no "
                              "decoder (see GET /v1/models)", 422)
        config, seed = self.sampler_config(request)
        lengths = requested_lengths(request)
        self._check_estimate(inputs, request.outputs, lengths)
        prepared = self.prepare(inputs, request.outputs, lengths)
        tokens = sum(r.length for r in prepared.regions)
        if tokens > limits.max_output_tokens:
            raise ClientError(f"the response would have {tokens} positions, over the limit of "
                              f"{limits.max_output_tokens} (ask for shorter `lengths`)", 413)
        total = len(prepared.prompt) + tokens
        if total > self.max_total_tokens:
            raise ClientError(f"the prompt ({len(prepared.prompt)} tokens) and the response ({tokens} "
                              f"positions) make {total}, over the limit of {self.max_total_tokens}", 413)
        return Job(prepared, config, seed, start, start + limits.request_timeout_s)

    def prepare(self, inputs: list[Input], outputs: list[str], lengths: dict[str, int]):
        """`pipe.prepare`, its refusals as 422s."""
        try:
            return self.pipe.prepare(inputs, outputs, lengths)
        except RequestError as exc:
            raise ClientError(str(exc), 422) from None
        except ValueError as exc:  # a tokenizer refusing an input it cannot encode
            raise ClientError(f"an input could not be encoded: {exc}", 422) from None

    def decode_inputs(self, request: GenerateRequest) -> list[Input]:
        """The request's parts within the limits: text checked, media decoded (a
        `ClientError` naming the part and the limit)."""
        limits = self.cfg.limits
        if len(request.inputs) > limits.max_inputs:
            raise ClientError(f"{len(request.inputs)} input parts, over the limit of {limits.max_inputs}", 413)
        inputs: list[Input] = []
        for i, part in enumerate(request.inputs):
            if part.type == "text":
                if len(part.text) > limits.max_text_chars:
                    raise ClientError(f"inputs[{i}] (text) has {len(part.text)} characters, over the "
                                      f"limit of {limits.max_text_chars}", 413)
                try:
                    part.text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ClientError(f"inputs[{i}] (text) is not valid Unicode text", 422) from None
                inputs.append(part.text)
            elif part.type == "image":
                inputs.append(decode_image(part.data, limits.max_image_pixels, i))
            else:
                inputs.append(decode_audio(part.data, limits.max_audio_seconds, i, limits.max_sample_rate,
                                           limits.max_channels))
        return inputs

    def _check_estimate(self, inputs: list[Input], outputs: list[str], lengths: dict[str, int]) -> None:
        """413 when the prompt and response cannot fit `max_total_tokens`, counted before
        any medium is tokenized: text tokens exactly, media from their sizes (an image's
        codes, an audio's seconds at the codec's rate, less one), the response from the
        lengths asked for and an image output's grid. It never counts more than `prepare`
        will (the exact count after it is checked too), so it refuses no request that fits."""
        text = self.pipe.text_tokenizer
        prompt = self._template_tokens
        for x in inputs:
            if isinstance(x, str):
                prompt += len(text.encode(x))
            elif isinstance(x, PILImage.Image):
                prompt += self._codes_per_image + 2  # begin and end of image
            elif isinstance(x, Audio) and self.pipe.speech_codec is not None:
                prompt += max(0, math.floor(x.seconds * self.pipe.speech_codec.codes_per_second) - 1) + 2
        wanted = tuple(o for o in OUTPUT_MODALITIES if o in outputs)
        if OUTPUTS.get(wanted) == "spoken":  # one spoken answer holds the text and the speech
            response = lengths.get("spoken", 0)
        else:  # the lengths of the wanted outputs only: `prepare` ignores the others
            response = sum(lengths.get(o, 0) for o in ("text", "speech") if o in wanted)
        if "image" in wanted and self.pipe.image_tokenizer is not None:
            rows, cols = self.pipe.image_grid()
            response += rows * cols
        if prompt + response > self.max_total_tokens:
            raise ClientError(f"the prompt (at least {prompt} tokens, counted from the inputs' sizes) and the "
                              f"response (at least {response} positions) make more than the limit of "
                              f"{self.max_total_tokens}", 413)

    def sampler_config(self, request: GenerateRequest) -> tuple[SamplerConfig, int]:
        """The request's sampler options over the deployment's defaults, over the
        model's presets for this kind of output (`presets.json`), within the caps of
        `limits`: a request over a cap gets a 422 naming it."""
        given = request.sampler.model_dump(exclude_none=True)
        problem = over_cap(given, self.cfg.limits)
        if problem:
            raise ClientError(problem, 422)
        defaults = self.cfg.sampler
        presets = self.pipe.preset_options(request.outputs)
        for key in ("steps", "seed"):  # the deployment's steps, the request's seed
            presets.pop(key, None)
        steps = given.pop("steps", defaults.steps)
        seed = given.pop("seed", None)
        if seed is None:
            seed = secrets.randbelow(2**31)
        confidence = defaults.image_confidence if "image" in request.outputs else defaults.confidence
        options = within_caps({"temperature": defaults.temperature, "confidence": confidence, **presets,
                               **defaults.options, **given}, self.cfg.limits)
        try:
            return SamplerConfig(steps=steps, seed=seed, **options), seed
        except ValueError as exc:
            raise ClientError(f"sampler: {exc}", 422) from None

    # ------------------------------------------------------------------ generation
    def run(self, jobs: list[Job]) -> list[GenerateResponse | Exception]:
        """Generate a batch: one sampler call per group of equal layout and options."""
        timeout = self.cfg.limits.request_timeout_s
        results: list[GenerateResponse | Exception] = [RuntimeError("not run")] * len(jobs)
        wanted = []
        for i, job in enumerate(jobs):
            if job.wanted:
                wanted.append(i)
            else:  # cancelled or timed out while it waited: never started
                results[i] = job.refusal(timeout)
                self.stopped += 1
        for group in batches([batch_key(jobs[i].prepared, jobs[i].config) for i in wanted]):
            members = [wanted[k] for k in group]
            batch = [jobs[i] for i in members]
            try:
                outputs = self._generate(batch, self._stop_unwanted(batch))
                for i, out in zip(members, outputs):
                    results[i] = self.response(jobs[i], out, len(batch)) if jobs[i].wanted \
                        else jobs[i].refusal(timeout)
            except Stopped:
                self.stopped += len(batch)
                for i in members:
                    results[i] = jobs[i].refusal(timeout)
            except Exception as exc:  # one group's failure is not the others'
                logger.exception("sampler call failed for %d requests", len(batch))
                for i in members:
                    results[i] = exc
        return results

    @staticmethod
    def _stop_unwanted(batch: list[Job]) -> Callable[[int, torch.Tensor], None]:
        """A sampler step callback that stops the call once none of its jobs is wanted."""
        def on_step(step: int, ids: torch.Tensor) -> None:
            if not any(job.wanted for job in batch):
                raise Stopped(f"stopped after {step} steps: no request in the batch is still wanted")
        return on_step

    def refuse_if_unwanted(self, job: Job) -> None:
        """Raise the job's refusal (and count it stopped) once it is no longer wanted:
        before a stream starts, at each of its steps, between its audio chunks."""
        if not job.wanted:
            self.stopped += 1
            raise job.refusal(self.cfg.limits.request_timeout_s)

    def progress(self, job: Job, skip_failed_previews: bool = False) -> Callable[[int, torch.Tensor], dict]:
        """The progress event of `job`'s stream after `done` steps, from its response ids
        `[R]`: the step, the most steps its sampling can take, the masked positions left
        and, at `sampler.stream_previews` evenly spaced steps, a `preview` of what is
        committed (`skip_failed_previews`: a preview that raises is logged and left out;
        otherwise it raises)."""
        layout = self.pipe.layout(job.prepared)
        bound = min(job.config.steps, layout.num_masked)
        previews = max(0, self.cfg.sampler.stream_previews)
        marks = {round(bound * (k + 1) / (previews + 1)) for k in range(previews)}

        def event(done: int, ids: torch.Tensor) -> dict:
            progress = {"step": done, "max_steps": bound, "masked": int((ids == self.pipe.vocab.mask_id).sum())}
            if done in marks:
                try:
                    progress["preview"] = self.preview(job.prepared, layout, ids)
                except Exception:
                    if not skip_failed_previews:
                        raise
                    logger.exception("a stream's preview failed")  # a courtesy: the stream goes on without it
            return progress

        return event

    def stream(self, job: Job, emit: Callable[[dict], None],
               emit_audio: Callable[[dict], None] | None = None) -> GenerateResponse:
        """One request with a progress event per step and `stream_previews` previews
        (`emit_audio` is for engines that stream speech in chunks; this one does not)."""
        self.refuse_if_unwanted(job)
        progress = self.progress(job)

        def on_step(done: int, ids: torch.Tensor) -> None:  # after `done` steps
            self.refuse_if_unwanted(job)
            emit(progress(done, ids[0]))

        out = self._generate([job], on_step)[0]
        return self.response(job, out, 1)

    def ticket(self, job: Job, emit: Callable[[dict], None] | None = None) -> Ticket:
        """The job as a scheduler ticket (step mode); with `emit`, a progress event per
        step and `stream_previews` previews, as `stream` sends them."""
        timeout = self.cfg.limits.request_timeout_s
        on_step = None
        if emit is not None:
            progress = self.progress(job, skip_failed_previews=True)

            def send(done: int, ids: torch.Tensor) -> None:  # on the events thread
                emit(progress(done, ids))

            def on_step(done: int, most: int, ids: torch.Tensor) -> None:  # on the scheduler's thread
                # (`most` is the bound `progress` computes too)
                self._events.submit(send, done, ids.clone())  # the next step changes ids
        self.requests += 1
        return Ticket(job.prepared, job.config, job.seed, wanted=lambda: job.wanted,
                      refusal=lambda: job.refusal(timeout), on_step=on_step)

    def after_events(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the events thread once the progress events queued so far are
        emitted (a stream's result comes after its last progress event)."""
        self._events.submit(fn)

    def _generate(self, batch: list[Job], on_step=None) -> list[Output]:
        self.sampler_calls += 1
        self.requests += len(batch)
        return self.pipe.generate_batch([j.prepared for j in batch], batch[0].config,
                                        seeds=[j.seed for j in batch], on_step=on_step)

    def response(self, job: Job, out: Output, batch_size: int) -> GenerateResponse:
        return GenerateResponse(
            model=self.cfg.model.name, text=out.text,
            image=encode_png(out.image) if out.image is not None else None,
            speech=encode_wav(out.speech, out.sample_rate) if out.speech is not None else None,
            sample_rate=out.sample_rate if out.speech is not None else None,
            usage=Usage(prompt_tokens=out.prompt_tokens, output_tokens=out.tokens, steps=out.steps,
                        seconds=round(time.perf_counter() - job.start, 4), batch_size=batch_size,
                        seed=job.seed))

    def preview(self, prepared: Prepared, layout: Layout, ids: torch.Tensor) -> dict:
        """What is committed so far: the text without its masks, and the image with its
        masked positions drawn as the most common committed code (the background, mostly)."""
        vocab, pipe = self.pipe.vocab, self.pipe
        preview: dict = {}
        for r, region in enumerate(layout.regions):
            region_ids = ids[layout.region_index.to(ids.device) == r]
            committed = region_ids[region_ids != vocab.mask_id]
            if region.modality == "text":
                stops = {vocab.im_end_id, vocab.pad_id}
                kept = [t for t in committed.tolist() if t not in stops]
                preview["text"] = pipe.text_tokenizer.decode(kept).strip()
            elif region.modality == "image" and committed.numel() and pipe.image_tokenizer is not None:
                fill = Counter(committed.tolist()).most_common(1)[0][0]
                codes = vocab.ids_to_image(torch.where(region_ids == vocab.mask_id, fill, region_ids))
                preview["image"] = encode_png(pipe.image_tokenizer.decode_images(codes[None], pipe.image_grid())[0])
        return preview
