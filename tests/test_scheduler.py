"""Step-level batching without Ray: the scheduler runs every active request one
denoising step at a time in shared forward passes, whatever their layouts and sampler
options; requests join at the next step and leave when done or no longer wanted. Run on
the tiny any-to-any model of tests/any2any.py, whose trained answers are known."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from omni_model.any_to_any import AnyToAny
from omni_model.sampler import Denoiser, SamplerConfig
from omni_model.templates import Image, Speech, Text
from serve.errors import SamplingFailed, SchedulerStopped, Stopped
from serve.scheduler import StepScheduler, Ticket, full_pass_sizes
from tests.any2any import IMAGE_TOKENIZER, answer_lengths

TASKS = ["t2i", "vqa", "asr", "tts", "s2i", "svqa", "all"]


@pytest.fixture(scope="module")
def pipe(any2any):
    folder, codec, _ = any2any
    return AnyToAny.from_pretrained(folder, image_tokenizer=IMAGE_TOKENIZER, speech_tokenizer=codec)


@pytest.fixture
def scheduler(pipe):
    scheduler = StepScheduler(pipe, max_rows=32)
    yield scheduler
    scheduler.close()


def _ticket(pipe, tasks, task, seed=0, **options) -> Ticket:
    inputs, outputs, parts = tasks[task]
    prepared = pipe.prepare(inputs, outputs, answer_lengths(parts, outputs))
    return Ticket(prepared, SamplerConfig(**{"steps": 64, **options}), seed)


def _assert_trained_answer(out, parts):
    for part in parts:
        if isinstance(part, Text):
            assert out.text == part.text
        elif isinstance(part, Image):
            assert out.image_codes == list(part.codes)
        else:
            assert isinstance(part, Speech) and out.speech_codes == list(part.codes)


OPTIONS = [{}, {"threshold": 0.9}, {"confidence": "margin"}, {"cache": "prefix", "cache_refresh": 4},
           {"early_stop": True}, {"steps": 48, "factor": 1.0}, {"cache": "dual", "block_length": 8}]


def test_mixed_layouts_and_options_share_forward_passes_and_each_gets_its_answer(pipe, scheduler, any2any):
    _, _, tasks = any2any
    tickets = [_ticket(pipe, tasks, task, **options) for task, options in zip(TASKS, OPTIONS)]
    futures = [scheduler.submit(t) for t in tickets]
    outputs = [f.result(timeout=300) for f in futures]
    for task, out in zip(TASKS, outputs):
        _assert_trained_answer(out, tasks[task][2])
    steps = sum(out.steps for out in outputs)
    assert scheduler.forward_passes < steps, (scheduler.forward_passes, steps)
    assert max(t.shared for t in tickets) == len(TASKS)
    # each answer equals the same request sampled alone
    for ticket, out in zip(tickets, outputs):
        alone = pipe.generate_batch([ticket.prepared], ticket.config, seeds=[ticket.seed])[0]
        assert (alone.text, alone.image_codes, alone.speech_codes) == (out.text, out.image_codes, out.speech_codes)


def test_seeds_stay_per_request_in_shared_steps(pipe, scheduler):
    prepared = [pipe.prepare([f"Paint picture {seed}."], ["image"]) for seed in range(6)]
    config = SamplerConfig(steps=16, temperature=1.0)
    futures = [scheduler.submit(Ticket(p, config, seed)) for seed, p in enumerate(prepared)]
    together = [f.result(timeout=300).image_codes for f in futures]
    alone = [pipe.generate_batch([p], config, seeds=[seed])[0].image_codes for seed, p in enumerate(prepared)]
    assert together == alone and len({tuple(c) for c in together}) > 1


def test_a_request_that_arrives_mid_generation_joins_at_the_next_step(pipe, scheduler):
    long = Ticket(pipe.prepare(["Tell a long story."], ["text"], {"text": 200}), SamplerConfig(steps=200), 0)
    started = threading.Event()
    long.on_step = lambda done, most, ids: started.set() if done == 3 else None
    long_future = scheduler.submit(long)
    assert started.wait(120)
    short = Ticket(pipe.prepare(["Say hi."], ["text"], {"text": 8}), SamplerConfig(steps=4), 1)
    steps_seen = []
    short.on_step = lambda done, most, ids: steps_seen.append((done, most))
    out = scheduler.submit(short).result(timeout=300)
    assert not long_future.done()  # the short one did not wait for the long one
    assert steps_seen == [(1, 4), (2, 4), (3, 4), (4, 4)] and out.steps == 4
    assert long_future.result(timeout=600).steps == 200


def test_a_request_no_longer_wanted_leaves_at_the_next_step(pipe, scheduler):
    wanted = threading.Event()
    wanted.set()
    ticket = Ticket(pipe.prepare(["Tell a long story."], ["text"], {"text": 100}), SamplerConfig(steps=100), 0,
                    wanted=wanted.is_set, refusal=lambda: Stopped("the client went away"))
    ticket.on_step = lambda done, most, ids: wanted.clear() if done == 5 else None
    with pytest.raises(Stopped):
        scheduler.submit(ticket).result(timeout=300)
    assert ticket.state.step == 5 and scheduler.stopped == 1
    # the scheduler goes on serving
    other = Ticket(pipe.prepare(["Say hi."], ["text"], {"text": 4}), SamplerConfig(steps=4), 0)
    assert scheduler.submit(other).result(timeout=300).steps == 4


def test_a_cache_refreshed_every_step_matches_the_uncached_request_in_a_shared_step(pipe, scheduler, any2any):
    _, _, tasks = any2any
    plain = [_ticket(pipe, tasks, t, temperature=0.8, seed=3) for t in ("svqa", "t2i")]
    cached = [_ticket(pipe, tasks, t, temperature=0.8, seed=3, cache="prefix", cache_refresh=1)
              for t in ("svqa", "t2i")]
    futures = [scheduler.submit(t) for t in plain + cached]
    outs = [f.result(timeout=300) for f in futures]
    for a, b in zip(outs[:2], outs[2:]):
        assert (a.text, a.image_codes, a.speech_codes) == (b.text, b.image_codes, b.speech_codes)


def test_cached_requests_share_their_span_passes_and_each_gets_its_answer(pipe, any2any):
    """Every task with the prefix cache at once: between refreshes their spans (of
    different widths, against caches of different lengths, a guided request's two rows
    included) go through shared span passes, and each answer equals the request alone."""
    _, _, tasks = any2any
    scheduler = StepScheduler(pipe, max_rows=32, max_padding=100.0)  # one pass for all spans
    try:
        tickets = [_ticket(pipe, tasks, task, cache="prefix", cache_refresh=4, seed=i) for i, task in enumerate(TASKS)]
        tickets.append(_ticket(pipe, tasks, "t2i", cache="prefix", cache_refresh=4, cfg_scale=1.5))
        outputs = [f.result(timeout=300) for f in [scheduler.submit(t) for t in tickets]]
        for task, out in zip(TASKS, outputs):
            _assert_trained_answer(out, tasks[task][2])
        for ticket, out in zip(tickets, outputs):
            alone = pipe.generate_batch([ticket.prepared], ticket.config, seeds=[ticket.seed])[0]
            assert (alone.text, alone.image_codes, alone.speech_codes) == (out.text, out.image_codes, out.speech_codes)
        # 64 steps, a full pass every 4th: 16 full and 48 span passes if all stay in step
        assert scheduler.forward_passes <= 2 * 64, scheduler.forward_passes
    finally:
        scheduler.close()


def test_rows_in_flight_stay_within_max_rows(pipe):
    scheduler = StepScheduler(pipe, max_rows=2)
    try:
        tickets = [Ticket(pipe.prepare([f"Say {i}."], ["text"], {"text": 6}), SamplerConfig(steps=6), i)
                   for i in range(5)]
        futures = [scheduler.submit(t) for t in tickets]
        assert all(f.result(timeout=300).steps == 6 for f in futures)
        assert max(t.shared for t in tickets) <= 2
        assert scheduler.rows_stepped / scheduler.steps <= 2
    finally:
        scheduler.close()


def test_requests_of_very_different_lengths_get_separate_passes_when_padding_would_dominate(pipe):
    short = [pipe.prepare([f"Hi {i}."], ["text"], {"text": 4}) for i in range(3)]
    long = [pipe.prepare(["Tell a long story."], ["text"], {"text": 120})]
    for max_padding, passes in ((0.0, 2), (10.0, 1)):
        scheduler = StepScheduler(pipe, max_rows=32, max_padding=max_padding)
        try:
            group = [(Ticket(p, SamplerConfig(steps=1), 0), 0, 0) for p in short + long]
            for ticket, _, _ in group:
                ticket.layout = pipe.layout(ticket.prepared)
                ticket.state = Denoiser([ticket.prepared.prompt], ticket.layout, ticket.config,
                                        pipe.vocab.pad_id, torch.device("cpu"))
            buckets = scheduler._buckets(group, full_pass_sizes)
            assert len(buckets) == passes
            assert buckets[0][0][0].prepared is long[0]  # the longest first
        finally:
            scheduler.close()


def test_the_steps_run_with_the_schedulers_threads_and_decoding_with_one(pipe, any2any):
    """serve/threads.py: one thread computes with several torch threads, the others with one."""
    _, _, tasks = any2any
    seen: dict[str, int] = {}
    scheduler = StepScheduler(pipe, threads=3)
    ticket = _ticket(pipe, tasks, "vqa")
    ticket.on_step = lambda *_: seen.setdefault("step", torch.get_num_threads())
    decode = pipe.decode

    def decoding(*args):
        seen["decode"] = torch.get_num_threads()
        return decode(*args)

    pipe.decode = decoding
    try:
        scheduler.submit(ticket).result(timeout=120)
    finally:
        del pipe.decode
        scheduler.close()
    assert seen == {"step": 3, "decode": 1}


def test_a_failing_request_fails_alone_and_the_others_finish(pipe, scheduler):
    """8 concurrent requests; one's step callback raises after its logits, another's prompt
    holds an id past the vocabulary so the shared forward pass itself fails. Each of the
    two gets its own error; the other 6 finish with the answers they get alone."""
    prepared = [pipe.prepare([f"Paint picture {seed}."], ["image"]) for seed in range(8)]
    config = SamplerConfig(steps=16, temperature=1.0)
    tickets = [Ticket(p, config, seed) for seed, p in enumerate(prepared)]

    def broken_callback(done, most, ids):
        if done == 3:
            raise RuntimeError("a callback bug")

    tickets[2].on_step = broken_callback
    bad = tickets[5].prepared
    out_of_vocab = torch.full_like(bad.prompt[:1], pipe.model.config.vocab_size)
    tickets[5].prepared = type(bad)(torch.cat([bad.prompt, out_of_vocab]), bad.uncond, bad.regions, bad.outputs)
    futures = [scheduler.submit(t) for t in tickets]
    for i in (2, 5):
        with pytest.raises(SamplingFailed) as err:
            futures[i].result(timeout=300)
        assert err.value.message == "the request's sampling failed"
    assert isinstance(futures[2].exception().__cause__, RuntimeError)
    assert isinstance(futures[5].exception().__cause__, IndexError)
    healthy = [i for i in range(8) if i not in (2, 5)]
    together = [futures[i].result(timeout=300) for i in healthy]
    assert all(out.steps == 16 for out in together)
    alone = [pipe.generate_batch([prepared[i]], config, seeds=[i])[0].image_codes for i in healthy]
    assert [out.image_codes for out in together] == alone
    assert scheduler.failed == 2 and scheduler.alive


def test_a_waiting_request_no_longer_wanted_leaves_the_queue_without_being_computed(pipe):
    """max_rows=2: a guided request fills them, so the next waits. Its client goes away
    (or its deadline passes) while it waits: it leaves the queue at the next step, never
    admitted, while the running request goes on."""
    scheduler = StepScheduler(pipe, max_rows=2)
    try:
        running = Ticket(pipe.prepare(["Tell a long story."], ["text"], {"text": 200}),
                         SamplerConfig(steps=200, cfg_scale=1.0), 0)
        started = threading.Event()
        running.on_step = lambda done, most, ids: started.set() if done == 2 else None
        running_future = scheduler.submit(running)
        assert started.wait(120)
        wanted = threading.Event()
        wanted.set()
        waiting = Ticket(pipe.prepare(["Say hi."], ["text"], {"text": 8}), SamplerConfig(steps=4), 1,
                         wanted=wanted.is_set, refusal=lambda: Stopped("the client went away"))
        future = scheduler.submit(waiting)
        time.sleep(0.5)
        assert scheduler.in_flight == 2 and waiting.state is None  # it waits for rows
        wanted.clear()
        with pytest.raises(Stopped):
            future.result(timeout=30)
        assert waiting.state is None  # never admitted, never computed
        assert not running_future.done() and scheduler.in_flight == 1 and scheduler.stopped == 1
        running_future.cancel()
    finally:
        scheduler.close()


def test_a_dead_scheduler_loop_fails_its_requests_refuses_new_ones_and_says_so(pipe):
    """The loop raising outside a step (here: admission) ends the thread; its requests and
    any submitted later get `SchedulerStopped` at once instead of waiting forever, and
    `alive` turns false (the replica's health check reads it)."""
    scheduler = StepScheduler(pipe)
    try:
        assert scheduler.alive

        def broken_admit(arrived):
            raise RuntimeError("a scheduler bug")

        scheduler._admit = broken_admit
        first = scheduler.submit(Ticket(pipe.prepare(["Say hi."], ["text"], {"text": 8}), SamplerConfig(steps=4), 0))
        with pytest.raises(SchedulerStopped):
            first.result(timeout=30)
        scheduler._thread.join(timeout=30)
        assert not scheduler.alive
        later = scheduler.submit(Ticket(pipe.prepare(["Say hi."], ["text"], {"text": 8}), SamplerConfig(steps=4), 0))
        with pytest.raises(SchedulerStopped):
            later.result(timeout=5)
    finally:
        scheduler.close()
