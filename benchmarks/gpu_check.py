"""The GPU paths in one staged, bounded run (never a CI dependency), for a lent GPU with
little time on it. Each stage runs under its own time cap; an error or a timeout ends
that stage only (recorded with its type, message and traceback) and the next one runs;
the whole JSON report is rewritten after every stage (and within stages), so a run cut
short still reports what it measured.

    python benchmarks/gpu_check.py [--stages a,b,c,d] [--shards DIR] [--vocab 176264] [--out FILE]
    python benchmarks/gpu_check.py --small --out /tmp/gc.json     # the script itself, tiny, on CPU
    python benchmarks/gpu_check.py --make-shards .gpu/shards      # a shard set to carry to the GPU

a. the model alone in plain PyTorch: `Transformer` at ~1B (hidden 2048, 16 layers, 16
   heads, 4 KV heads, SwiGLU 5632) with the output layer padded to `--vocab`, trained on
   the project's objective (`diffusion_loss_of_batch`) over packed rows with the
   document mask as `attention_mask_4d` builds it today; bf16 autocast over fp32 weights,
   gradients and AdamW state. Variants: eager (AdamW foreach), eager with fused AdamW,
   FlexAttention's document mask with fused AdamW, the stage-(b) shape (its ratio base,
   fused AdamW as stage b has it on a GPU), and the training path's GPU settings
   together: FlexAttention, fused AdamW and `model.compile=blocks` (own time cap).
   Tokens/s, MFU (`_gpu_harness.train_flops_per_token`), peak memory, and which SDPA
   kernels accept that mask.
b. one training stage through Ray Train with DeepSpeed (`run_stage`) on `--shards`, one
   GPU worker, bf16, ZeRO-2 then ZeRO-3: a fit, then the same run resumed from its
   checkpoint for a few more steps (the step counter must continue). The model has the
   1B's layer shapes but `--train-layers` of its layers and the shards' own vocabulary:
   a DeepSpeed checkpoint is ~14 bytes a parameter, written, copied by Ray and restored,
   and the full 1.4B would spend the stage's budget on the disk.
c. the sampler on the GPU with random bf16 weights, at ~1B and at Dream-7B's shape
   (28 layers, hidden 3584, 28 heads, 4 KV heads, FFN 18944), both at `--vocab`: seconds
   per sample at batch 1..64 for a t2i request (20 prompt + 256 image positions, 16
   steps), batch 1 again with every step over the whole vocabulary (the sampler before
   it stepped on the image codes' columns), and the uncached / prefix / dual caches for
   a spoken-VQA one (119 + 64).
d. the Serve app (GPU config, one replica on the GPU, step batching) on stage (b)'s
   final model (else a random one), t2i and text requests from 1 and 8 closed-loop
   clients for `--serve-seconds` each.

`--small` runs all of it tiny on whatever device there is (a check of the script).
`--merge FILE` keeps the stages of an earlier report that this run does not run (two
runs on one machine: a and c, then b and d, report together).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from _gpu_harness import (CapExceeded, Report, Shape, Stage, describe_error, log, mean_context, mfu, peak_flops,
                          run_stages, time_cap, train_flops_per_token)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # on a machine where the project is not installed
    sys.path.append(str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures"
IMAGE_TOKENIZER, SPEECH_TOKENIZER = FIXTURES / "magvit_tiny_a", FIXTURES / "glm4voice_tiny_a"

#: model shapes: (hidden, layers, heads, kv_heads, ffn)
SHAPES = {
    "1b": (2048, 16, 16, 4, 5632),
    "7b": (3584, 28, 28, 4, 18944),  # Dream-7B (Qwen2.5-7B)
    "small": (64, 2, 4, 2, 160),
    "small-7b": (96, 3, 6, 2, 256),
}
#: the released model's image and speech codebooks (its vocab: Dream's text ids, specials, both)
IMAGE_CODES, SPEECH_CODES = 8192, 16384
DEFAULT_CAPS = {"a": 150.0, "b": 240.0, "c": 150.0, "d": 120.0}
#: --small on a 2-core CPU: Ray, DeepSpeed's first CPU op build and Serve dominate
SMALL_CAPS = {"a": 180.0, "b": 720.0, "c": 180.0, "d": 360.0}
STAGE_NAMES = {"a": "a_model_plain_torch", "b": "b_ray_train_deepspeed", "c": "c_sampler", "d": "d_serve"}


def padded_vocab(size: int):
    """A fresh vocab of exactly `size` ids (text ids fill what the codes and specials
    leave), so the embedding and output layer have the real model's size."""
    from omni_model.vocab import REQUIRED_SPECIALS, Vocab

    image, speech = min(IMAGE_CODES, size // 4), min(SPEECH_CODES, size // 4)
    vocab = Vocab.fresh(size - image - speech - len(REQUIRED_SPECIALS), image, speech)
    assert vocab.size == size, (vocab.size, size)
    return vocab


def model_config(shape: str, vocab, layers: int | None = None):
    from omni_model.transformer import TransformerConfig

    hidden, n_layers, heads, kv, ffn = SHAPES[shape]
    return TransformerConfig(vocab_size=vocab.size, hidden_size=hidden, intermediate_size=ffn,
                             num_hidden_layers=layers or n_layers, num_attention_heads=heads,
                             num_key_value_heads=kv, mask_token_id=vocab.mask_id, pad_token_id=vocab.pad_id)


def flop_shape(config) -> Shape:
    return Shape(config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                 config.num_key_value_heads, config.intermediate_size, config.vocab_size)


def random_model(config, device: torch.device, dtype: torch.dtype):
    """A `Transformer` made on `device` in `dtype` with random N(0, 0.02) weights: built
    on the meta device and initialised in place, so a 7B model never exists on the CPU."""
    from torch import nn

    from omni_model.transformer import RMSNorm, Transformer

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, config.initializer_range)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    return model


def packed_batches(vocab, rows: int, seq: int, count: int, seed: int = 0) -> tuple[list, list[int]]:
    """`count` packed batches of `rows` full rows of `seq` tokens: documents of random
    length (seq/8 .. seq/2, the last one cut to fit), each a text prompt then a response
    of image codes; returns the batches and every document's length."""
    from omni_model.batching import pack_rows

    gen = torch.Generator().manual_seed(seed)
    text, image = vocab.text_range, vocab.image_range
    batches, lengths = [], []
    for _ in range(count):
        layout = []
        for _ in range(rows):
            docs, used = [], 0
            while used < seq:
                n = min(seq - used, int(torch.randint(seq // 8, seq // 2 + 1, (1,), generator=gen)))
                prompt = max(1, int(0.4 * n))
                ids = torch.cat([torch.randint(text.start, text.stop, (prompt,), generator=gen),
                                 torch.randint(image.start, image.stop, (n - prompt,), generator=gen)])
                response = torch.arange(n) >= prompt
                docs.append((ids, response))
                lengths.append(n)
                used += n
            layout.append(docs)
        batches.append(pack_rows(layout, seq, vocab.pad_id))
    return batches, lengths


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sdpa_kernels(device: torch.device, heads: int, kv_heads: int, head_dim: int) -> dict[str, str]:
    """Which SDPA kernels accept the model's attention call (bf16, a boolean
    `[B, 1, L, L]` document mask, grouped-query heads): 'ok' or the reason refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    q = torch.randn(2, heads, 256, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, kv_heads, 256, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    doc = torch.arange(256, device=device) // 64
    mask = (doc[:, None] == doc[None, :]).expand(2, 1, 256, 256)
    out = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads).sum().backward()
            out[backend.name.lower()] = "ok"
        except Exception as e:  # noqa: BLE001 - a refusal is the answer
            out[backend.name.lower()] = f"refused: {str(e).splitlines()[0][:160]}"
    return out


@dataclass
class Timing:
    tokens_per_s: float
    step_ms: float
    steps: int
    first_step_s: float
    peak_memory_gib: float | None


def time_training(model, batches: list, vocab, steps: int, warmup: int, device: torch.device,
                  fused: bool, label: str) -> Timing:
    """`warmup` then `steps` timed steps of the project's objective with AdamW (lr 1e-4,
    clip 1.0) over `batches` in turn; bf16 autocast on CUDA."""
    from omni_model.objective import Objective, diffusion_loss_of_batch

    objective = Objective()
    options = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, **options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        out = diffusion_loss_of_batch(model, batch, vocab, objective, autocast=amp)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        sync(device)
        t0 = time.perf_counter()
        step(0)
        sync(device)
        first = time.perf_counter() - t0
        log(f"  {label}: first step {first:.2f} s")
        for i in range(1, warmup):
            step(i)
        sync(device)
        t0 = time.perf_counter()
        tokens = 0
        for i in range(steps):
            step(warmup + i)
            tokens += int(batches[(warmup + i) % len(batches)].attention_mask.sum())
        sync(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    finally:
        del opt
        model.zero_grad(set_to_none=True)
        free_memory()
    return Timing(tokens / seconds, 1000 * seconds / steps, steps, first, peak)


def flex_against_sdpa(model, batch, vocab, device: torch.device) -> dict[str, float]:
    """One step's loss and gradients with the dense SDPA mask and with FlexAttention's
    block mask, on the same masked batch (fp32, no autocast): their largest differences.
    (FlexAttention has no backward pass on a CPU: this is where its gradients are checked.)"""
    from omni_model.objective import Objective, diffusion_loss_of_batch

    outs = []
    for kernel in ("sdpa", "flex"):
        model.set_attention(kernel).zero_grad(set_to_none=True)
        out = diffusion_loss_of_batch(model, batch, vocab, Objective(),
                                      generator=torch.Generator(device=device).manual_seed(0))
        out.loss.backward()
        outs.append((out.loss.item(), out.logits.detach().float(),
                     torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
        del out
    model.set_attention("sdpa").zero_grad(set_to_none=True)
    (loss_d, logits_d, grad_d), (loss_f, logits_f, grad_f) = outs
    result = {"loss_sdpa": loss_d, "loss_flex": loss_f,
              "logits_max_abs_diff": float((logits_d - logits_f).abs().max()),
              "grad_rel_diff": float((grad_d - grad_f).norm() / grad_d.norm().clamp(min=1e-30))}
    del outs, logits_d, logits_f, grad_d, grad_f
    free_memory()
    log(f"  flex vs sdpa: loss {loss_d:.5f} / {loss_f:.5f}, logits max diff {result['logits_max_abs_diff']:.2e}, "
        f"gradient relative diff {result['grad_rel_diff']:.2e}")
    return result


class Check:
    """The stages and what they hand each other (stage b's model to stage d, stage a's
    train-shape speed to stage b's ratio)."""

    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        self.args = args
        self.report = report
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.device_name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.peak = peak_flops(self.device_name) if self.cuda else None
        self.small = args.small
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ray_owned: bool | None = None  # None: not started by us
        self.serve_model: Path | None = None
        self._shards: Path | None = Path(args.shards).resolve() if args.shards else None

    # ------------------------------------------------------------------ shared pieces
    def shape(self, big: bool = False) -> str:
        if self.small:
            return "small-7b" if big else "small"
        return "7b" if big else "1b"

    def shards(self) -> Path:
        """The shard set folder (holding `train/`): `--shards`, else one built here."""
        if self._shards is None:
            import _world

            log(f"no --shards: building a {self.args.scenes}-scene world (needs espeak-ng)")
            self._shards = _world.make_shards(self.workdir / "world", self.args.scenes, tts_workers=2)
        return self._shards

    def shards_vocab(self):
        """The vocab stage (b) trains with: the byte tokenizer's ids and the shards' codes."""
        from pipelines.data.shards import check_compatible
        from pipelines.train.initial_model import resolve_vocab

        cfg = self.train_config(2, self.workdir / "probe", 1)
        return resolve_vocab(cfg, check_compatible([self.shards() / "train"]))[0]

    def train_config(self, zero: int, run_dir: Path, steps: int):
        """Stage (b)'s `StageConfig`: configs/tiny/stage1.yaml with the check's shape,
        data, schedule and scaling."""
        from omni_model.config import load_config
        from pipelines.train import DataSource, StageConfig

        a = self.args
        hidden, _, heads, kv, ffn = SHAPES[self.shape()]
        layers = SHAPES[self.shape()][1] if self.small else a.train_layers
        over = [f"data.shards={self.shards()}", "data.text_tokenizer=null", f"run.dir={run_dir}",
                f"train.max_steps={steps}", f"train.log_every={a.log_every}", f"train.checkpoint_every={steps}",
                "train.keep_checkpoints=1", "run.stall_timeout_s=300", "run.max_failures=0",
                f"model.fresh={{hidden: {hidden}, layers: {layers}, heads: {heads}, kv_heads: {kv}, ffn: {ffn}}}",
                f"data.max_seq_len={a.seq}", f"data.rows_per_step={a.rows}",
                "scaling.num_workers=1", "scaling.backend=deepspeed", f"scaling.zero_stage={zero}",
                f"scaling.use_gpu={str(self.cuda).lower()}", f"scaling.bf16={str(self.cuda).lower()}",
                f"scaling.cpus_per_worker={a.worker_cpus}", f"ray.num_cpus={a.ray_cpus}"]
        cfg = load_config(StageConfig, ROOT / "configs/tiny/stage1.yaml", over)
        return replace(cfg, data=replace(cfg.data, mixture=(DataSource("train"),)))

    def ensure_ray(self) -> None:
        if self.ray_owned is not None:
            return
        from pipelines.ray_setup import RayConfig
        from pipelines.ray_setup import start_ray

        # Ray Train workers write checkpoints to their temp folder, and a resumed worker
        # copies its checkpoint there and never removes it: keep both inside the work
        # folder (deleted per variant), Ray's own session under the usual temp folder.
        os.environ.setdefault("RAY_TMPDIR", tempfile.gettempdir())
        worker_tmp = self.workdir / "worker_tmp"
        worker_tmp.mkdir(exist_ok=True)
        os.environ["TMPDIR"] = str(worker_tmp)
        if self.cuda:
            os.environ["DS_ACCELERATOR"] = "cuda"
        t0 = time.perf_counter()
        self.ray_owned = start_ray(RayConfig(num_cpus=self.args.ray_cpus, num_gpus=1 if self.cuda else 0))
        log(f"Ray up in {time.perf_counter() - t0:.1f} s")

    def stop_ray(self) -> None:
        if self.ray_owned is None:
            return
        from pipelines.ray_setup import stop_ray

        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()
        stop_ray(self.ray_owned)
        self.ray_owned = None

    # ------------------------------------------------------------------ stage a
    def stage_model(self, record: dict[str, Any]) -> None:
        a, res = self.args, record["result"]
        vocab = padded_vocab(a.vocab)
        config = model_config(self.shape(), vocab)
        batches, lengths = packed_batches(vocab, a.rows, a.seq, 4)
        context = mean_context(lengths)
        batches = [b.to(self.device) for b in batches]
        res.update(device=self.device_name, peak_flops=self.peak, shape=self.shape(), vocab=vocab.size,
                   rows=a.rows, seq=a.seq, mean_document=round(statistics.mean(lengths), 1),
                   attention_context=round(context, 1),
                   precision=("bf16 autocast; fp32 weights, gradients and AdamW state" if self.cuda
                              else "fp32 (no GPU)"),
                   attention="SDPA with the dense boolean [B,1,L,L] document mask of attention_mask_4d")
        variants: dict[str, Any] = res.setdefault("variants", {})

        def attempt(name: str, fn) -> None:
            """Run one variant; its failure is recorded and the next variant runs."""
            try:
                fn()
            except CapExceeded as e:
                if e.label != name:
                    raise
                variants[name] = {"status": "timeout", "error": describe_error(e)}
            except torch.cuda.OutOfMemoryError as e:
                variants[name] = {"status": "oom", "error": describe_error(e)}
            except Exception as e:  # noqa: BLE001 - the next variant still runs
                variants[name] = {"status": "error", "error": describe_error(e)}
            finally:
                free_memory()
                self.report.save()

        def timed(name: str, model, batches: list, vocab, config, context: float, steps: int, warmup: int,
                  fused: bool = False) -> None:
            timing = time_training(model, batches, vocab, steps, warmup, self.device, fused, name)
            shape = flop_shape(config)
            variants[name] = {**variants.get(name, {}), **timing.__dict__,
                              "mfu": mfu(shape, context, timing.tokens_per_s, self.peak),
                              "mfu_dense_attention": mfu(shape, a.seq, timing.tokens_per_s, self.peak)}
            log(f"  {name}: {timing.tokens_per_s:,.0f} tokens/s, {timing.step_ms:.0f} ms/step"
                + (f", MFU {variants[name]['mfu']:.1%}" if self.peak else "")
                + (f", peak {timing.peak_memory_gib:.1f} GiB" if timing.peak_memory_gib else ""))

        def kernels() -> None:
            res["sdpa_kernels_for_this_mask"] = sdpa_kernels(self.device, config.num_attention_heads,
                                                             config.num_key_value_heads, config.head_dim)

        if self.cuda:
            attempt("sdpa_probe", kernels)
        model = random_model(config, self.device, torch.float32)
        res.update(parameters=model.num_parameters, matmul_parameters=flop_shape(config).matmul_params,
                   flops_per_token=train_flops_per_token(flop_shape(config), context),
                   flops_per_token_dense_attention=train_flops_per_token(flop_shape(config), a.seq))
        # eager first: the stage's headline
        attempt("eager", lambda: timed("eager", model, batches, vocab, config, context, a.steps, a.warmup))
        if variants["eager"].get("status") == "oom":
            half = [b.to(self.device) for b in packed_batches(vocab, max(1, a.rows // 2), a.seq, 4)[0]]
            attempt("eager_half_rows", lambda: timed("eager_half_rows", model, half, vocab, config, context,
                                                     a.steps, a.warmup))
        if self.cuda:
            attempt("eager_fused_adamw", lambda: timed("eager_fused_adamw", model, batches, vocab, config, context,
                                                       max(5, a.steps // 2), 2, fused=True))

        if self.cuda:  # FlexAttention's block-sparse document mask (model.attention=flex)
            attempt("flex_vs_sdpa", lambda: variants.update(
                flex_vs_sdpa=flex_against_sdpa(model, batches[0], vocab, self.device)))

            def flex() -> None:
                model.set_attention("flex")
                try:
                    timed("flex_attention_fused_adamw", model, batches, vocab, config, context,
                          max(5, a.steps // 2), 3, fused=True)
                finally:
                    model.set_attention("sdpa")

            attempt("flex_attention_fused_adamw", flex)

        def train_shape() -> None:
            """Stage (b)'s shape and vocabulary in plain PyTorch: (b)'s ratio base."""
            tvocab = self.shards_vocab()
            tconfig = model_config(self.shape(), tvocab, None if self.small else a.train_layers)
            tbatches, tlengths = packed_batches(tvocab, a.rows, a.seq, 4)
            tmodel = random_model(tconfig, self.device, torch.float32)
            variants["train_shape"] = {"layers": tconfig.num_hidden_layers, "vocab": tvocab.size,
                                       "parameters": tmodel.num_parameters}
            try:
                timed("train_shape", tmodel, [b.to(self.device) for b in tbatches], tvocab, tconfig,
                      mean_context(tlengths), max(5, a.steps // 2), 2, fused=self.cuda)
            finally:
                del tmodel

        attempt("train_shape", train_shape)
        if a.compile == "on" or (a.compile == "auto" and self.cuda):
            def compiled() -> None:
                """The training path's GPU settings together: model.compile=blocks (each
                block compiled; the whole model compiled lost time on an H200), and on a
                GPU model.attention=flex with fused AdamW. The model's last use here."""
                from pipelines.train.parallelism import compile_blocks

                with time_cap(a.compile_cap, "compile_blocks"):
                    try:
                        model.set_attention("flex" if self.cuda else "sdpa")
                        timed("compile_blocks", compile_blocks(model), batches, vocab, config, context,
                              a.steps, 3, fused=self.cuda)
                    finally:
                        torch._dynamo.reset()

            attempt("compile_blocks", compiled)
        del model
        free_memory()

    # ------------------------------------------------------------------ stage b
    def stage_train(self, record: dict[str, Any]) -> None:
        from pipelines.train import TRAIN_STATE, latest_checkpoint, run_stage

        a, res = self.args, record["result"]
        self.ensure_ray()
        steps, more = (a.train_steps, a.resume_steps)
        base = self.report.data["stages"].get(STAGE_NAMES["a"], {}).get("result", {}).get("variants", {})
        plain = base.get("train_shape", {}).get("tokens_per_s")
        res.update(plain_torch_train_shape_tokens_per_s=plain, steps=steps, resume_steps=more)
        for zero in a.zero_stages:
            name = f"zero{zero}"
            entry: dict[str, Any] = res.setdefault(name, {})
            run_dir = self.workdir / "train" / name
            try:
                cfg = self.train_config(zero, run_dir, steps)
                entry.update(layers=cfg.model.fresh.layers, hidden=cfg.model.fresh.hidden,
                             rows=cfg.data.rows_per_step, seq=cfg.data.max_seq_len)
                t0 = time.perf_counter()
                log(f"  {name}: fit of {steps} steps")
                run_stage(cfg)
                entry["fit_s"] = round(time.perf_counter() - t0, 1)
                metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
                timed = metrics[1:] or metrics  # the first window holds the start-up
                entry["tokens_per_s"] = statistics.mean(m["tokens_per_s"] for m in timed)
                entry["data_wait_fraction"] = statistics.mean(m["data_wait_fraction"] for m in timed)
                entry["loss_first_last"] = [metrics[0]["loss"], metrics[-1]["loss"]]
                if plain:
                    entry["ratio_to_plain_torch"] = entry["tokens_per_s"] / plain
                saved = latest_checkpoint(run_dir)
                entry["checkpoint_step"] = saved and json.loads((saved / TRAIN_STATE).read_text())["step"]
                log(f"  {name}: {entry['tokens_per_s']:,.0f} tokens/s, fit {entry['fit_s']} s, "
                    f"checkpoint at step {entry['checkpoint_step']}")
                self.report.save()

                t0 = time.perf_counter()
                log(f"  {name}: resume to step {steps + more}")
                run_stage(replace(cfg, train=replace(cfg.train, max_steps=steps + more,
                                                     checkpoint_every=steps + more)))
                entry["resume_fit_s"] = round(time.perf_counter() - t0, 1)
                after = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][len(metrics):]
                final_step = json.loads((run_dir / "final" / TRAIN_STATE).read_text())["step"]
                entry.update(resumed_steps_logged=[m["step"] for m in after], final_step=final_step,
                             resumed=bool(after) and min(m["step"] for m in after) > steps
                             and final_step == steps + more)
                log(f"  {name}: resumed {'ok' if entry['resumed'] else 'NOT as expected'}: steps logged "
                    f"{entry['resumed_steps_logged']}, final step {final_step}")
                serve_model = self.workdir / "serve_model"
                shutil.rmtree(serve_model, ignore_errors=True)
                shutil.copytree(run_dir / "final", serve_model)
                self.serve_model = serve_model
                entry["status"] = "ok"
            except CapExceeded:
                raise
            except Exception as e:  # noqa: BLE001 - ZeRO-3 still runs when ZeRO-2 failed
                entry.update(status="error", error=describe_error(e))
                log(f"  {name}: {type(e).__name__}: {str(e)[:300]}")
                # a failed fit can leave its placement group: the next fit gets a new Ray
                self.stop_ray()
                self.ensure_ray()
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)  # a ~1B DeepSpeed checkpoint is GBs
                shutil.rmtree(self.workdir / "worker_tmp", ignore_errors=True)
                (self.workdir / "worker_tmp").mkdir(exist_ok=True)
                self.report.save()
        if not any(res.get(f"zero{z}", {}).get("status") == "ok" for z in a.zero_stages):
            raise RuntimeError("no DeepSpeed variant completed (see each variant's error)")

    # ------------------------------------------------------------------ stage c
    def stage_sampler(self, record: dict[str, Any]) -> None:
        from omni_model.sampler import Region, SamplerConfig, make_layout, sample, spoken_layout

        a, res = self.args, record["result"]
        vocab = padded_vocab(a.vocab)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        image_len, svqa_prompt, svqa_len, steps = (64, 40, 32, 4) if self.small else (256, 119, 64, 16)
        gen = torch.Generator().manual_seed(0)
        text = vocab.text_range

        def prompts(n: int, length: int) -> list[torch.Tensor]:
            return [torch.randint(text.start, text.stop, (length,), generator=gen) for _ in range(n)]

        def timed(model, batch: list[torch.Tensor], layout, config: SamplerConfig) -> float:
            sample(model, batch, layout, replace(config, steps=min(2, config.steps)), pad_id=vocab.pad_id)  # warm-up
            sync(self.device)
            t0 = time.perf_counter()
            sample(model, batch, layout, config, pad_id=vocab.pad_id)
            sync(self.device)
            return (time.perf_counter() - t0) / len(batch)

        t2i = make_layout(vocab, [Region("image", image_len)])
        spoken = spoken_layout(vocab, svqa_len, 0.2)
        res.update(dtype=str(dtype), vocab=vocab.size, steps=steps,
                   t2i_shape={"prompt": 20, "image_positions": image_len},
                   svqa_shape={"prompt": svqa_prompt, "response": svqa_len, "batch": 16})
        for label in dict.fromkeys((self.shape(), self.shape(big=True))):
            entry: dict[str, Any] = res.setdefault(label, {})
            shape = label
            model = None
            try:
                t0 = time.perf_counter()
                config = model_config(shape, vocab)
                model = random_model(config, self.device, dtype).eval()
                sync(self.device)
                entry.update(parameters=model.num_parameters, build_s=round(time.perf_counter() - t0, 1))
                log(f"  sampler {label}: {model.num_parameters / 1e9:.2f}B parameters built in {entry['build_s']} s")
                by_batch = entry.setdefault("t2i_seconds_per_sample_by_batch", {})  # str keys, as JSON has them
                for b in a.batches:
                    by_batch[str(b)] = timed(model, prompts(b, 20), t2i, SamplerConfig(steps=steps))
                    log(f"  sampler {label}: t2i batch {b}: {by_batch[str(b)]:.4f} s/sample")
                    self.report.save()
                if "1" in by_batch and "32" in by_batch:
                    entry["throughput_batch32_over_batch1"] = by_batch["1"] / by_batch["32"]
                # the sampler before it stepped on a request's own columns: every step's
                # softmax, selection and draw over all of the vocabulary's ids
                import omni_model.sampler as sampler_module

                narrow, sampler_module.NARROW_SHARE = sampler_module.NARROW_SHARE, 0.0
                try:
                    entry["t2i_batch1_whole_vocabulary_s"] = timed(model, prompts(1, 20), t2i,
                                                                   SamplerConfig(steps=steps))
                finally:
                    sampler_module.NARROW_SHARE = narrow
                log(f"  sampler {label}: t2i batch 1 over the whole vocabulary: "
                    f"{entry['t2i_batch1_whole_vocabulary_s']:.4f} s/sample")
                self.report.save()
                caches = entry.setdefault("svqa_seconds_per_sample_by_cache", {})
                batch = prompts(16, svqa_prompt)
                for name, options in (("none", {}), ("prefix", {"cache": "prefix", "cache_refresh": 4}),
                                      ("dual", {"cache": "dual", "cache_refresh": 4, "block_length": 16})):
                    caches[name] = timed(model, batch, spoken, SamplerConfig(steps=steps, **options))
                    log(f"  sampler {label}: spoken VQA, cache {name}: {caches[name]:.4f} s/sample")
                    self.report.save()
                entry["status"] = "ok"
            except CapExceeded:
                raise
            except Exception as e:  # noqa: BLE001 - the 7B still runs when the 1B failed
                entry.update(status="error", error=describe_error(e))
                log(f"  sampler {label}: {type(e).__name__}: {str(e)[:300]}")
            finally:
                del model
                free_memory()
                self.report.save()

    # ------------------------------------------------------------------ stage d
    def random_model_folder(self) -> Path:
        """A random-weight checkpoint folder of stage (b)'s shape for Serve, when stage
        (b) left none: model, vocab.json and tokenizers.json as a stage writes them."""
        from pipelines.data.shards import check_compatible
        from omni_model.model_folder import write_tokenizers
        from pipelines.train import build_model, resolve_vocab

        folder = self.workdir / "random_model"
        cfg = self.train_config(2, self.workdir / "probe", 1)
        identity = check_compatible([self.shards() / "train"])
        vocab, _ = resolve_vocab(cfg, identity)
        build_model(cfg, vocab, None, None).save_pretrained(folder)
        vocab.save(folder)
        write_tokenizers(folder, {"text": None, "image": identity.get("image"), "speech": identity.get("speech")})
        return folder

    def stage_serve(self, record: dict[str, Any]) -> None:
        a, res = self.args, record["result"]
        model_dir = self.serve_model
        res["model"] = "stage b's final checkpoint" if model_dir else "random weights (stage b left no model)"
        if model_dir is None:
            model_dir = self.random_model_folder()
        self.ensure_ray()
        from ray import serve

        from serve.app import build
        from serve.config import load_serve_config

        port = free_port()
        config = ROOT / ("configs/tiny/serve.yaml" if self.small else "configs/base/serve.yaml")
        overrides = [f"model.model={model_dir}", f"model.image_tokenizer={IMAGE_TOKENIZER}",
                     f"model.speech_tokenizer={SPEECH_TOKENIZER}", "batching.mode=step",
                     "deployment.num_replicas=1", f"deployment.num_gpus={1 if self.cuda else 0}",
                     "deployment.num_cpus=1", "deployment.max_ongoing_requests=64", "limits.max_pending=256",
                     f"http.port={port}"]
        cfg = load_serve_config(config, overrides)
        res.update(config=str(config.relative_to(ROOT)), overrides=overrides[3:])
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(build(cfg), name="omni", route_prefix="/")
            res["start_s"] = round(time.perf_counter() - t0, 1)
            log(f"  serve: up in {res['start_s']} s")
            steps = 4 if self.small else 16
            bodies = [{"inputs": [{"type": "text", "text": text}], "outputs": [out],
                       "sampler": {"steps": steps, "seed": i}}
                      for i, (text, out) in enumerate([
                          ("Generate an image of a large red circle on the left.", "image"),
                          ("What colour is the sky on a clear day?", "text"),
                          ("Generate an image of two small blue squares at the top.", "image"),
                          ("Name a shape with three sides.", "text")])]
            warm = closed_loop(url, bodies, 1, 0.0, requests_each=len(bodies))
            res["warm_up"] = warm
            if warm["errors"]:
                raise RuntimeError(f"warm-up requests failed: {warm['first_error']}")
            levels = res.setdefault("levels", [])
            for clients in a.clients:
                row = closed_loop(url, bodies, clients, a.serve_seconds)
                levels.append(row)
                log(f"  serve: {clients} client(s): {row['requests']} requests, {row['rps']:.2f}/s, "
                    f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, {row['errors']} errors")
                self.report.save()
        finally:
            serve.shutdown()


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_loop(url: str, bodies: list[dict], clients: int, seconds: float, requests_each: int = 10**9) -> dict:
    """`clients` closed-loop clients posting `bodies` in turn until `seconds` pass (or
    each has sent `requests_each`): requests/s, p50/p99 latency, errors."""
    import requests

    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    def client(c: int) -> None:
        with requests.Session() as session:
            i = c
            for _ in range(requests_each):
                start = time.perf_counter()
                try:
                    r = session.post(url + "/v1/generate", json=bodies[i % len(bodies)], timeout=120)
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except Exception as e:  # noqa: BLE001 - counted, the load goes on
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                i += clients
                if seconds and time.perf_counter() >= deadline:
                    return

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    pick = (lambda q: 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else (lambda q: None)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(ordered), "rps": len(ordered) / wall,
            "p50_ms": pick(0.5), "p99_ms": pick(0.99), "errors": len(errors),
            "first_error": errors[0] if errors else None}


def summarise(stages: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of whatever stages have run."""
    out: dict[str, Any] = {name: stages[name].get("status") for name in stages}
    a = stages.get(STAGE_NAMES["a"], {}).get("result", {}).get("variants", {})
    for name, v in a.items():
        if "tokens_per_s" in v:
            out[f"a.{name}"] = {"tokens_per_s": round(v["tokens_per_s"]), "mfu": v.get("mfu") and round(v["mfu"], 3),
                                "peak_gib": v.get("peak_memory_gib") and round(v["peak_memory_gib"], 1)}
    b = stages.get(STAGE_NAMES["b"], {}).get("result", {})
    for name, v in b.items():
        if isinstance(v, dict) and "tokens_per_s" in v:
            out[f"b.{name}"] = {"tokens_per_s": round(v["tokens_per_s"]),
                                "ratio_to_plain_torch": v.get("ratio_to_plain_torch") and round(
                                    v["ratio_to_plain_torch"], 3), "resumed": v.get("resumed")}
    c = stages.get(STAGE_NAMES["c"], {}).get("result", {})
    for name, v in c.items():
        by = v.get("t2i_seconds_per_sample_by_batch", {}) if isinstance(v, dict) else {}
        if by:
            out[f"c.{name}"] = {"t2i_s_per_sample_by_batch": {b: round(t, 4) for b, t in by.items()},
                                "throughput_b32_over_b1": v.get("throughput_batch32_over_batch1"),
                                "svqa_s_per_sample_by_cache": {k: round(t, 4) for k, t in
                                                               v.get("svqa_seconds_per_sample_by_cache", {}).items()}}
    d = stages.get(STAGE_NAMES["d"], {}).get("result", {})
    if d.get("levels"):
        out["d.serve"] = [{k: r[k] for k in ("clients", "rps", "p50_ms", "p99_ms", "errors")} for r in d["levels"]]
    return out


def make_shard_set(out: Path, scenes: int) -> None:
    """Build a small world here (espeak-ng, the fixture tokenizers) and copy its shard
    set to `out` (holding `train/`), a few hundred KB to carry to a GPU machine."""
    import _world

    with tempfile.TemporaryDirectory() as tmp:
        shards = _world.make_shards(Path(tmp), scenes, tts_workers=2)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(shards, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"shard set of {scenes} scenes in {out}: {size / 1e3:.0f} KB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="a,b,c,d", help="which stages, in order a,b,c,d")
    p.add_argument("--small", action="store_true", help="everything tiny on any device (checks the script)")
    p.add_argument("--out", default=None, help="the JSON report (default $OUT/gpu_check.json when $OUT is set)")
    p.add_argument("--merge", default=None, help="an earlier report: keep its stages that this run does not run")
    p.add_argument("--shards", default=None, help="a shard set folder holding train/ (default: build a world)")
    p.add_argument("--make-shards", default=None, metavar="DIR", help="only build a shard set into DIR, then exit")
    p.add_argument("--scenes", type=int, default=400, help="world size for --make-shards or a missing --shards")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one, removed)")
    p.add_argument("--budget", type=float, default=None, help="seconds for all stages together (default 540; "
                   "small 1440)")
    p.add_argument("--caps", default="", help="per-stage caps in seconds, e.g. a=150,b=240 (defaults: "
                   + ",".join(f"{k}={v:.0f}" for k, v in DEFAULT_CAPS.items()) + ")")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary of stages a and c (default 176264; small 1024)")
    p.add_argument("--seq", type=int, default=None, help="packed row length (default 2048; small 256)")
    p.add_argument("--rows", type=int, default=None, help="rows per step (default 8; small 2)")
    p.add_argument("--steps", type=int, default=None, help="stage a: timed steps (default 15; small 3)")
    p.add_argument("--warmup", type=int, default=3, help="stage a: warm-up steps")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="stage a's torch.compile variant")
    p.add_argument("--compile-cap", type=float, default=110.0, help="seconds for the compile variant")
    p.add_argument("--train-layers", type=int, default=4, help="stage b: layers of the 1B shape trained")
    p.add_argument("--train-steps", type=int, default=None, help="stage b: steps of the first fit (default 30)")
    p.add_argument("--resume-steps", type=int, default=None, help="stage b: steps after resuming (default 5)")
    p.add_argument("--log-every", type=int, default=None, help="stage b: steps per metrics window (default 5)")
    p.add_argument("--zero", default="2,3", help="stage b: ZeRO stages to run")
    p.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray (default 8; small 4)")
    p.add_argument("--worker-cpus", type=int, default=None, help="CPUs of the training worker (default 4; small 1)")
    p.add_argument("--batches", default=None, help="stage c: batch sizes (default 1,2,4,8,16,32,64; small 1,2,4)")
    p.add_argument("--clients", default=None, help="stage d: closed-loop clients per level (default 1,8; small 1,2)")
    p.add_argument("--serve-seconds", type=float, default=None, help="stage d: seconds per level (default 20; small 4)")
    args = p.parse_args(argv)
    small = args.small
    defaults = {"vocab": (176264, 1024), "seq": (2048, 256), "rows": (8, 2), "steps": (15, 3),
                "train_steps": (30, 6), "resume_steps": (5, 2), "log_every": (5, 2), "ray_cpus": (8, 4),
                "worker_cpus": (4, 1), "batches": ("1,2,4,8,16,32,64", "1,2,4"), "clients": ("1,8", "1,2"),
                "serve_seconds": (20.0, 4.0), "budget": (540.0, 1440.0)}
    for key, (big, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if small else big)
    args.batches = [int(x) for x in str(args.batches).split(",") if x]
    args.clients = [int(x) for x in str(args.clients).split(",") if x]
    args.zero_stages = [int(x) for x in args.zero.split(",") if x]
    args.stage_keys = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(args.stage_keys) - set(STAGE_NAMES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}: choose from a,b,c,d")
    args.cap_overrides = {k: float(v) for k, v in (kv.split("=") for kv in args.caps.split(",") if kv)}
    if args.out is None and os.environ.get("OUT"):
        args.out = str(Path(os.environ["OUT"]) / "gpu_check.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_shards:
        make_shard_set(Path(args.make_shards).resolve(), args.scenes)
        return 0
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "python": sys.version.split()[0], "stages": args.stage_keys, "small": args.small}
    report = Report(args.out, meta)
    report.summarise = summarise
    if args.merge and Path(args.merge).exists():
        earlier = json.loads(Path(args.merge).read_text())
        keep = {STAGE_NAMES[k] for k in STAGE_NAMES if k not in args.stage_keys}
        report.data["stages"].update({k: v for k, v in earlier.get("stages", {}).items() if k in keep})
        meta["merged_from"] = {"file": args.merge, "started": earlier.get("meta", {}).get("started")}
    check = Check(args, report)
    if not check.cuda:  # stage b's worker runs one thread: compare like for like (and 2 busy cores thrash)
        torch.set_num_threads(1)
    log(f"gpu_check on {check.device_name} (torch {torch.__version__}), stages {args.stage_keys}, "
        f"report {args.out or '(stdout only)'}, work folder {check.workdir}")
    caps = SMALL_CAPS if args.small else DEFAULT_CAPS
    stages = [Stage("a", STAGE_NAMES["a"], caps["a"], check.stage_model),
              Stage("b", STAGE_NAMES["b"], caps["b"], check.stage_train),
              Stage("c", STAGE_NAMES["c"], caps["c"], check.stage_sampler),
              Stage("d", STAGE_NAMES["d"], caps["d"], check.stage_serve)]

    def cleanup(stage: Stage, failure: BaseException | None) -> None:
        free_memory()
        if stage.key == "b" and failure is not None:
            check.stop_ray()  # a fit cut off by its cap can hold the GPU and its placement group

    try:
        ok = run_stages(stages, args.stage_keys, report, args.budget, args.cap_overrides, cleanup)
    finally:
        check.stop_ray()
        if not args.workdir:
            shutil.rmtree(check.workdir, ignore_errors=True)
        report.data["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        report.save()
    print(json.dumps(report.data["summary"], indent=2, default=str), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
