"""Step-level batching: one denoising step at a time over every active request.

A replica's requests do not wait for each other. The scheduler thread keeps a set of
active requests, each a `Denoiser` (one row, two with classifier-free guidance: the
unconditional row travels with its request), driven through the sampler's step API only
(`begin`, `inputs`, `keep_cache`, `span`, `advance`: omni_model/sampler.py). Every step:

1. requests that arrived since the last step join (up to `max_rows` rows in flight);
   requests no longer wanted (client gone, past the deadline) leave before any work;
2. every request that needs a full pass (no cache, or its cache is due for refresh)
   shares a forward pass: prompts left-padded and responses right-padded to the
   longest, whatever their layouts, lengths and sampler options (each request keeps its
   own options: they act after the logits, request by request). Requests of very
   different lengths go into separate passes when one pass would spend more than
   `max_padding` of its positions on padding (on a CPU a padded position costs as much
   as a real one);
3. requests whose cache holds compute only their own positions against it, all in one
   pass too (`Transformer.forward_spans`: spans right-padded to the widest, caches to
   the longest; split by `max_padding` the same way);
4. each request commits its positions and reports its own progress; a finished request
   leaves at once and is decoded on another thread while the next step runs.

Failures stay with the request that caused them. A shared pass that raises is run again
one request at a time: a request that fails alone leaves with `SamplingFailed` (its own
error as the cause), the others go on from the same step. A request whose commit or
progress callback raises leaves the same way. Waiting requests honour their client and
deadline too: one no longer wanted leaves the queue at the next step, never computed.
If the loop itself fails (outside any request's step), every request held and every one
submitted after gets `SchedulerStopped` at once and `alive` turns false (the replica's
health check reads it, so Serve replaces the replica).

Threads: the steps run with `threads` torch threads, the decoding thread with one (see
`serve/threads.py`: on a CPU, a second thread computing with several makes both slow).

`@serve.batch` (`Engine.run`) stays as the other mode (`batching.mode: batch`).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import torch

from omni_model.any_to_any import AnyToAny, Output, Prepared
from omni_model.sampler import Denoiser, Layout, SamplerConfig
from serve.errors import DecodingFailed, SamplingFailed, SchedulerStopped
from serve.threads import single_threaded_pool

logger = logging.getLogger(__name__)


@dataclass
class Ticket:
    """A request handed to the scheduler."""

    prepared: Prepared
    config: SamplerConfig
    seed: int
    #: still wanted? (a client gone or a deadline passed: the request leaves, `refusal()` says why)
    wanted: Callable[[], bool] = lambda: True
    refusal: Callable[[], Exception] = lambda: RuntimeError("no longer wanted")
    #: after each of its steps: (steps done, the most steps it can take, response ids [R])
    on_step: Callable[[int, int, torch.Tensor], None] | None = None
    future: Future = field(default_factory=Future)  #: resolves to the decoded `Output`
    shared: int = 1  #: the most requests it shared a forward pass with (for `usage`)
    # set by the scheduler
    state: Denoiser | None = None
    layout: Layout | None = None


class StepScheduler:
    """Runs tickets step by step on one thread; `submit` from any thread."""

    def __init__(self, pipe: AnyToAny, max_rows: int = 64, max_padding: float = 0.5,
                 threads: int | None = None) -> None:
        self.pipe = pipe
        self.threads = threads  #: torch threads of the steps (None: leave the thread's own)
        self.max_rows = max_rows
        self.max_padding = max_padding
        self.device = next(pipe.model.parameters()).device
        self._incoming: list[Ticket] = []
        self._active: list[Ticket] = []
        self._lock = threading.Condition()
        self._stop = False
        self._decoder = single_threaded_pool(1, "decode")
        self.steps = 0  #: scheduler steps run
        self.forward_passes = 0  #: model calls (full passes shared, span passes per request)
        self.rows_stepped = 0  #: rows summed over steps (rows per step = rows_stepped / steps)
        self.stopped = 0  #: tickets dropped because nobody wanted them any more
        self.failed = 0  #: tickets whose own step failed (the others went on)
        self._thread = threading.Thread(target=self._loop, name="step-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, ticket: Ticket) -> Future:
        """Queue a ticket; its future fails at once with `SchedulerStopped` when the loop
        is not running (nothing would ever resolve it)."""
        with self._lock:
            if self._stop or not self._thread.is_alive():
                _resolve(ticket.future, exc=SchedulerStopped())
                return ticket.future
            self._incoming.append(ticket)
            self._lock.notify()
        return ticket.future

    @property
    def in_flight(self) -> int:
        """Tickets waiting or stepping (not those being decoded)."""
        with self._lock:
            return len(self._active) + len(self._incoming)

    @property
    def alive(self) -> bool:
        """The loop is running (false once it failed or was closed)."""
        return self._thread.is_alive() and not self._stop

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=10)
        self._decoder.shutdown(wait=False)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            self._run()
            failure: BaseException = SchedulerStopped("the replica is shutting down")
        except BaseException as exc:  # a bug outside any request's step: the loop cannot go on
            logger.exception("the step scheduler's loop failed; failing its %d requests", self.in_flight)
            failure = SchedulerStopped()
            failure.__cause__ = exc
        with self._lock:
            self._stop = True  # submit() refuses from now on
            held, self._active, self._incoming = self._active + self._incoming, [], []
        for ticket in held:
            _resolve(ticket.future, exc=failure)

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        torch.set_grad_enabled(False)
        self.pipe.model.eval()
        while True:
            with self._lock:
                while not self._stop and not self._incoming and not self._active:
                    self._lock.wait()
                if self._stop:
                    return
                # under the lock (admission is cheap), so that `in_flight` never misses a
                # ticket between the queue and the active set; the queue is replaced only
                # after admission, so a failing loop still holds (and fails) every ticket
                self._incoming = self._admit(self._still_wanted(list(self._incoming)))
            self.step()

    def _still_wanted(self, tickets: list[Ticket]) -> list[Ticket]:
        """`tickets` less those nobody wants any more, which are resolved with their refusal."""
        kept = []
        for ticket in tickets:
            if ticket.future.done():  # cancelled by its owner
                continue
            if _call(ticket.wanted, ticket, default=True):
                kept.append(ticket)
            else:
                self.stopped += 1
                _resolve(ticket.future, exc=_call(ticket.refusal, ticket, default=RuntimeError("no longer wanted")))
        return kept

    def _admit(self, arrived: list[Ticket]) -> list[Ticket]:
        """Move arrived tickets in while the rows in flight stay within `max_rows`;
        returns those that must wait."""
        rows = sum(t.state.rows for t in self._active)
        waiting: list[Ticket] = []
        for ticket in arrived:
            need = 2 if ticket.config.cfg_scale > 0 else 1
            if waiting or (rows + need > self.max_rows and self._active):
                waiting.append(ticket)  # first come, first in: none overtakes a waiting one
                continue
            try:
                ticket.layout = self.pipe.layout(ticket.prepared)
                ticket.state = Denoiser([ticket.prepared.prompt], ticket.layout, ticket.config,
                                        self.pipe.vocab.pad_id, self.device,
                                        [ticket.prepared.uncond] if ticket.config.cfg_scale > 0 else None,
                                        [ticket.seed])
            except Exception as exc:
                self._fail(ticket, exc)
                continue
            self._active.append(ticket)
            rows += need
        return waiting

    def step(self) -> None:
        """One denoising step over every active ticket; a ticket whose own part of it
        fails leaves with `SamplingFailed`, the others go on."""
        live = self._still_wanted(self._active)
        self._active = live
        if not live:
            return
        plans = []
        for ticket in live:
            try:
                plans.append((ticket, *ticket.state.begin()))
            except Exception as exc:
                self._fail(ticket, exc)
        full = [(t, a, b) for t, a, b, is_full in plans if is_full]
        logits: dict[int, torch.Tensor] = {}
        for group in self._buckets(full, full_pass_sizes):
            logits.update(self._isolated(self._full_pass, group))
        spans = [(t, a, b) for t, a, b, is_full in plans if not is_full]
        for group in self._buckets(spans, span_pass_sizes):
            logits.update(self._isolated(self._span_pass, group))
        live = [t for t in live if id(t) in logits]
        self.steps += 1
        self.rows_stepped += sum(t.state.rows for t in live)
        stepped = []
        for ticket in live:
            ticket.shared = max(ticket.shared, len(live))
            state = ticket.state
            try:
                state.advance(logits[id(ticket)])
                if ticket.on_step is not None:
                    ticket.on_step(state.step, min(state.config.steps, ticket.layout.num_masked), state.response[0])
            except Exception as exc:
                self._fail(ticket, exc)
                continue
            stepped.append(ticket)
        finished = [t for t in stepped if t.state.done]
        self._active = [t for t in stepped if not t.state.done]
        for ticket in finished:
            self._decoder.submit(self._decode, ticket)

    def _isolated(self, run: Callable[[list[tuple[Ticket, int, int]]], dict[int, torch.Tensor]],
                  group: list[tuple[Ticket, int, int]]) -> dict[int, torch.Tensor]:
        """`run(group)`; when the shared pass raises, each ticket is run again alone so
        that only the ticket(s) that fail alone leave (with their own error). Running a
        pass again is safe: a pass hands a ticket its cache (`Denoiser.keep_cache`) only
        once it has succeeded, and the step commits nothing before every pass is done."""
        try:
            return run(group)
        except Exception as exc:
            if len(group) == 1:
                self._fail(group[0][0], exc)
                return {}
            logger.warning("a shared pass of %d requests failed (%s); running each alone", len(group),
                           type(exc).__name__)
        logits: dict[int, torch.Tensor] = {}
        for item in group:
            try:
                logits.update(run([item]))
            except Exception as exc:
                self._fail(item[0], exc)
        return logits

    def _fail(self, ticket: Ticket, exc: Exception) -> None:
        """Resolve `ticket` with `SamplingFailed` caused by `exc`; it leaves at this step."""
        logger.error("a request's step failed; it leaves, the others go on", exc_info=exc)
        self.failed += 1
        failure = SamplingFailed()
        failure.__cause__ = exc
        _resolve(ticket.future, exc=failure)

    def _buckets(self, group: list[tuple[Ticket, int, int]],
                 sizes: Callable[[Ticket, int, int], tuple[int, ...]]) -> list[list[tuple[Ticket, int, int]]]:
        """Tickets into passes whose padding stays within `max_padding` of the positions
        they hold, largest first. `sizes`: the lengths a pass pads apart for a ticket
        (a full pass: prompt and response; a span pass: the span)."""
        buckets: list[list[tuple[Ticket, int, int]]] = []
        for item in sorted(group, key=lambda g: -sum(sizes(*g))):
            if buckets:
                members = buckets[-1] + [item]
                rows = sum(t.state.rows for t, _, _ in members)
                padded = rows * sum(map(max, zip(*(sizes(*m) for m in members))))
                real = sum(m[0].state.rows * sum(sizes(*m)) for m in members)
                if padded <= (1 + self.max_padding) * real:
                    buckets[-1].append(item)
                    continue
            buckets.append([item])
        return buckets

    def _full_pass(self, group: list[tuple[Ticket, int, int]]) -> dict[int, torch.Tensor]:
        """One forward pass over every ticket of `group`, padded to the longest prompt
        (left) and the longest response (right); hands each cached ticket its rows' cache."""
        plen = max(t.state.plen for t, _, _ in group)
        rlen = max(t.layout.length for t, _, _ in group)
        ids, attn, frames = [], [], []
        for ticket, _, _ in group:
            frame = (plen - ticket.state.plen, rlen - ticket.layout.length)
            row_ids, row_attn = ticket.state.inputs(*frame)
            ids.append(row_ids)
            attn.append(row_attn)
            frames.append(frame)
        cached = any(t.state.uses_cache for t, _, _ in group)
        self.forward_passes += 1
        # logits only for the response positions some ticket predicts this step: never the
        # prompts (at a real vocabulary the output layer is the pass's largest tensor)
        lo, hi = min(a for _, a, _ in group), max(b for _, _, b in group)
        out = self.pipe.model(torch.cat(ids), attention_mask=torch.cat(attn), return_cache=cached,
                              logits_range=(plen + lo, plen + hi))
        out, kv = out if cached else (out, None)
        logits, row = {}, 0
        for (ticket, a, b), frame in zip(group, frames):
            rows = slice(row, row + ticket.state.rows)
            row += ticket.state.rows
            logits[id(ticket)] = out[rows, a - lo:b - lo]
            if ticket.state.uses_cache:
                ticket.state.keep_cache(kv.rows(rows), frame)
        return logits

    def _span_pass(self, group: list[tuple[Ticket, int, int]]) -> dict[int, torch.Tensor]:
        """Only positions `[a, b)` of each ticket's response, each against its own cache,
        in one pass."""
        self.forward_passes += 1
        if len(group) == 1:
            ticket, a, b = group[0]
            return {id(ticket): self.pipe.model.forward_span(*ticket.state.span(a, b))}
        logits = self.pipe.model.forward_spans([t.state.span(a, b) for t, a, b in group])
        return {id(t): out for (t, _, _), out in zip(group, logits)}

    def _decode(self, ticket: Ticket) -> None:
        try:
            state = ticket.state
            out = self.pipe.decode(ticket.prepared, ticket.layout, state.response[0], state.steps[0].item())
            _resolve(ticket.future, out)
        except Exception as exc:
            logger.exception("decoding a finished request failed")
            failure = DecodingFailed()
            failure.__cause__ = exc
            _resolve(ticket.future, exc=failure)


def full_pass_sizes(ticket: Ticket, a: int, b: int) -> tuple[int, int]:
    """What a full pass pads apart: the prompt (left) and the response (right)."""
    return ticket.state.plen, ticket.layout.length


def span_pass_sizes(ticket: Ticket, a: int, b: int) -> tuple[int]:
    """What a span pass pads: the span."""
    return (b - a,)


def _call(fn: Callable, ticket: Ticket, default):
    """A ticket's own callback (`wanted`, `refusal`); one that raises answers `default`
    rather than failing the loop."""
    try:
        return fn()
    except Exception:
        logger.exception("a request's callback failed")
        return default


def _resolve(future: Future, result: Output | None = None, exc: BaseException | None = None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:  # resolved (or cancelled by its owner) already
        pass

