"""Training a small MAGVIT-v2 image tokenizer (the embedded default's own).

Loss = L1 + L2 reconstruction, plus an image-gradient L1 term (differences between
neighbouring pixels), which keeps edges sharp where a pure pixel loss blurs them (a
cheap stand-in for the perceptual and adversarial losses the real tokenizer was
trained with; no pretrained perceptual network can be fetched here), plus the
quantizer's commitment and entropy terms (MAGVIT-v2 sec. 3.1; the codebook term over
every code, not per bit), plus a linear read-out of each code's patch colour that keeps
colour in every code of an object.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from omni_model.tokenizers.image import MagVitTokenizer
from omni_model.objective import warmup_cosine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageTrainConfig:
    steps: int = 1500  #: optimiser steps
    batch_size: int = 16
    lr: float = 1e-3  #: peak learning rate (warmup 5%, cosine to 10%)
    commit_weight: float = 0.25
    entropy_weight: float = 0.02  #: the full-codebook LFQ entropy term (0.1 spread codes but lost colour)
    gradient_weight: float = 0.5  #: weight of the image-gradient (edge) loss
    #: weight of a linear read-out of each code's patch mean colour (a 1x1 head on the
    #: quantized code, dropped after training): colour must then sit in every code of an
    #: object, not in a few shared bits the decoder spreads (which a generator, predicting
    #: codes independently, could not get right)
    patch_colour_weight: float = 1.0
    flip: bool = False  #: random horizontal flips (off: the world's positions have meaning)
    seed: int = 0
    log_every: int = 100


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = (reconstruction.clamp(-1, 1) - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def _gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(x), dx(y)) + F.l1_loss(dy(x), dy(y))


def image_loss(model: MagVitTokenizer, images: torch.Tensor, cfg: ImageTrainConfig,
               colour_head: torch.nn.Module | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    zq, commit, entropy = model.quantize(model.encoder(images))
    colour = torch.zeros((), device=zq.device)
    if colour_head is not None:
        patch_mean = F.adaptive_avg_pool2d(images, zq.shape[-2:])
        colour = F.mse_loss(colour_head(zq), patch_mean)
    rec = model.decoder(zq)
    l1 = F.l1_loss(rec, images)
    l2 = F.mse_loss(rec, images)
    grad = _gradient_l1(rec, images)
    loss = (l1 + l2 + cfg.gradient_weight * grad + cfg.commit_weight * commit
            + cfg.entropy_weight * entropy + cfg.patch_colour_weight * colour)
    return loss, {"loss": loss.item(), "l1": l1.item(), "commit": commit.item(),
                  "entropy": entropy.item(), "patch_colour": colour.item()}


def train_image_tokenizer(model: MagVitTokenizer, images: torch.Tensor,
                          cfg: ImageTrainConfig = ImageTrainConfig()) -> list[dict[str, float]]:
    """Fit `model` to `images` `[N, 3, R, R]` in [-1, 1]; returns the logged metrics."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(cfg.seed)
    device = model.device
    colour_head = None
    params = list(model.parameters())
    if cfg.patch_colour_weight > 0:
        colour_head = torch.nn.Conv2d(model.quantize.dim, 3, 1).to(device)
        params += list(colour_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, cfg.steps // 20, 0.1))
    model.train()
    history = []
    start = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="image tokenizer", unit="step", mininterval=5):
        idx = torch.randint(0, images.shape[0], (min(cfg.batch_size, images.shape[0]),), generator=gen)
        batch = images[idx].to(device)
        if cfg.flip:
            flip = torch.rand(batch.shape[0], generator=gen) < 0.5
            batch[flip] = batch[flip].flip(-1)
        loss, metrics = image_loss(model, batch, cfg, colour_head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            metrics["step"] = step
            history.append(metrics)
            logger.info("image tokenizer step %d loss %.4f l1 %.4f (%.0fs)", step,
                        metrics["loss"], metrics["l1"], time.perf_counter() - start)
    model.eval()
    return history


@torch.no_grad()
def evaluate_image_tokenizer(model: MagVitTokenizer, images: torch.Tensor,
                             batch_size: int = 64) -> dict[str, float]:
    """Mean PSNR (dB) of code round trips, and codebook usage, on held-out images."""
    scores, codes = [], []
    for i in range(0, images.shape[0], batch_size):
        batch = images[i:i + batch_size].to(model.device)
        c = model.encode(batch)
        rec = model.decode(c, model.grid_for(*batch.shape[-2:]))
        scores.append(psnr(rec, batch).cpu())
        codes.append(c.cpu())
    all_codes = torch.cat(codes)
    return {"psnr_db": torch.cat(scores).mean().item(),
            "codes_per_image": all_codes.shape[1],
            "distinct_codes": int(all_codes.unique().numel()),
            "codebook_size": model.codebook_size}
