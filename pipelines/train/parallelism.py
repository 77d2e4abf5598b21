"""How the model is trained across workers: DDP (gloo on CPU, NCCL on GPU) or
DeepSpeed ZeRO, behind one `ParallelModel` interface, with the stage's AdamW and its
warmup-cosine schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omni_model.objective import warmup_cosine
from omni_model.transformer import Transformer
from pipelines.train.config import StageConfig

OPTIMIZER_FILE = "optimizer.pt"  #: DDP's optimizer and scheduler state in a checkpoint


def lr_schedule(cfg: StageConfig):
    """The stage's learning-rate factor per step: warmup then cosine."""
    return warmup_cosine(cfg.train.max_steps, int(cfg.train.max_steps * cfg.optim.warmup_ratio),
                         cfg.optim.min_lr_ratio)


def _use_deepspeed(cfg: StageConfig) -> bool:
    if cfg.scaling.backend == "auto":
        return cfg.scaling.use_gpu
    if cfg.scaling.backend not in ("ddp", "deepspeed"):
        raise ValueError(f"unknown scaling.backend {cfg.scaling.backend!r}")
    return cfg.scaling.backend == "deepspeed"


def compile_blocks(model: Transformer) -> Transformer:
    """Each transformer block compiled in place (`torch.compile`, static shapes: a stage's
    packed rows all have one shape). The weights' names do not change, so checkpoints
    are the same; the embeddings and the output layer (logits of the masked positions
    only, a varying count) stay eager."""
    for block in model.model.layers:
        block.compile(dynamic=False)
    return model


def adamw(params, cfg: StageConfig, device: torch.device) -> torch.optim.AdamW:
    """The stage's torch AdamW, fused (every parameter's update in one kernel) where
    `optim.adamw` says so: on a GPU by default."""
    fused = cfg.optim.adamw == "fused" or (cfg.optim.adamw == "auto" and device.type == "cuda")
    return torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                             weight_decay=cfg.optim.weight_decay, fused=fused or None)


def deepspeed_config(cfg: StageConfig, world: int, bf16: bool) -> dict:
    zero: dict[str, Any] = {"stage": cfg.scaling.zero_stage, "overlap_comm": True,
                            "contiguous_gradients": True}
    if cfg.scaling.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.data.rows_per_step,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.rows_per_step * cfg.optim.grad_accum * world,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # skip an update whose gradients are not finite (DeepSpeed's default; fp32 always checks)
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class ParallelModel:
    """The model with its optimizer and schedule, behind one interface for DDP and DeepSpeed.

    DDP: a torch AdamW, accumulation by dividing the loss, clipping before the step.
    DeepSpeed: the same torch AdamW handed to `deepspeed.initialize` (no fused-op build),
    ZeRO stage, clipping, accumulation and bf16 from `deepspeed_config`.

    A step whose loss or gradient norm is NaN or inf on any rank is skipped on every rank
    (no update, no schedule step, gradients dropped): DDP reduces a flag over the ranks;
    DeepSpeed's ZeRO optimizer checks the reduced gradient norm itself and skips (a
    non-finite loss is made to give NaN gradients so that it is seen there too).
    """

    def __init__(self, cfg: StageConfig, model: Transformer, device: torch.device, world: int,
                 resume_dir: Path | None) -> None:
        import ray.train.torch

        self.cfg = cfg
        self.module = model
        self.device = device
        self.world = world
        self.optimizer = adamw(model.parameters(), cfg, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg))
        self.engine = None
        if _use_deepspeed(cfg):
            import deepspeed

            bf16 = cfg.scaling.bf16 and device.type == "cuda"
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model.to(device), optimizer=self.optimizer, lr_scheduler=self.scheduler,
                config=deepspeed_config(cfg, world, bf16))
            if resume_dir is not None and (resume_dir / "deepspeed").exists():
                self.engine.load_checkpoint(str(resume_dir / "deepspeed"), tag="state")
            self.net = self.engine
        else:
            self.net = ray.train.torch.prepare_model(model)
            if resume_dir is not None:
                state = torch.load(resume_dir / OPTIMIZER_FILE, map_location=device, weights_only=True)
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward pass (DeepSpeed also steps at each boundary)."""
        if self.engine is not None:
            if not torch.isfinite(loss.detach()):
                # An inf loss can still give finite gradients (d inf / d w = finite for a
                # sum); NaN gradients make DeepSpeed's overflow check skip the update.
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
        else:
            (loss / self.cfg.optim.grad_accum).backward()

    def step(self, loss_finite: torch.Tensor) -> bool:
        """Ends a step of `grad_accum` micro-batches; `loss_finite` says whether every
        micro-batch's loss on this rank was finite. Returns whether the update was applied,
        the same answer on every rank (False: a non-finite loss or gradient norm somewhere)."""
        if self.engine is not None:
            # the boundary's engine.step() ran in backward; its overflow check is over all ranks
            return bool(self.engine.was_step_applied())
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        bad = (~loss_finite.to(self.device) | ~torch.isfinite(norm.to(self.device))).float()
        if self.world > 1 and torch.distributed.is_initialized():
            # every rank must skip the same steps, or their replicas drift apart
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        applied = not bool(bad.item())
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def check_finite(self) -> None:
        """Raise `NonFiniteTraining` on every rank when a weight on any rank is NaN or inf
        (ZeRO-3: each rank checks its own shard)."""
        from pipelines.train.guards import NonFiniteTraining, check_finite_weights

        error = None
        try:
            check_finite_weights((name, getattr(p, "ds_tensor", p)) for name, p in self.module.named_parameters())
        except NonFiniteTraining as err:
            error = err
        bad = torch.tensor(float(error is not None), device=self.device)
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if error is not None:
            raise error
        if bad.item():
            raise NonFiniteTraining("non-finite weights on another rank: nothing is saved from them")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, rank: int) -> None:
        """Every rank joins (ZeRO shards are collective); rank 0 writes the model."""
        if self.engine is None:
            if rank == 0:
                self.module.save_pretrained(folder)
                torch.save({"optimizer": self.optimizer.state_dict(),
                            "scheduler": self.scheduler.state_dict()}, folder / OPTIMIZER_FILE)
            return
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        if self.cfg.scaling.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                if rank == 0:
                    self.module.save_pretrained(folder)
        elif rank == 0:
            self.module.save_pretrained(folder)
