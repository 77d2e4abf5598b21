"""bf16 autocast against float32 on this machine's CPU, measured in the same run: the
training step of the quickstart's diffusion model (configs/tiny/stage1.yaml's shape, one
worker's rows at one thread, as each Ray Train worker runs) and of the codec's
frozen-code decoder (configs/tiny/tokenizers.yaml's shape, two threads). Prints seconds
per step, the float32/bf16 ratio, and how far the bf16 loss is from the float32 loss
after the same steps on the same data (weights and optimizer stay float32 in both).

    .venv/bin/python benchmarks/precision.py [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from omni_model.precision import autocast, cpu_has_native_bf16
from omni_model.tokenizers.codec import CodeToMel, CodeToMelConfig
from omni_model.transformer import Transformer, TransformerConfig


def _time(make, step, steps: int, mode: str) -> tuple[float, float]:
    """Seconds per step after 3 warm-up steps, and the last loss."""
    torch.manual_seed(0)
    model, batch = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        with autocast("cpu", mode):
            loss = step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps, loss.item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    stage = yaml.safe_load(open("configs/tiny/stage1.yaml"))
    fresh, data = stage["model"]["fresh"], stage["data"]
    vocab = 2000
    rows = data["rows_per_step"] // stage["scaling"]["num_workers"]

    def lm():
        cfg = TransformerConfig(vocab_size=vocab, hidden_size=fresh["hidden"], intermediate_size=fresh["ffn"],
                                num_hidden_layers=fresh["layers"], num_attention_heads=fresh["heads"],
                                num_key_value_heads=fresh["kv_heads"])
        ids = torch.randint(0, vocab, (rows, data["max_seq_len"]))
        return Transformer(cfg), ids

    def lm_step(model, ids):
        logits = model(ids)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())

    dec_cfg = yaml.safe_load(open("configs/tiny/tokenizers.yaml"))["speech"]["decoder"]

    def decoder():
        cfg = CodeToMelConfig(d_model=dec_cfg["d_model"], layers=dec_cfg["layers"], ffn=dec_cfg["ffn"],
                              frames_per_code=4)
        codes = torch.randn(dec_cfg["batch_size"], 60, cfg.code_dim)
        return CodeToMel(cfg), (codes, torch.randn(dec_cfg["batch_size"], cfg.n_mels, 240))

    def dec_step(model, batch):
        codes, target = batch
        return (model(codes).float() - target).abs().mean()

    print(f"CPU bf16 (avx512_bf16/amx): {cpu_has_native_bf16()}; {args.steps} steps each\n")
    print("| step | float32 s | bf16 s | float32/bf16 | loss float32 | loss bf16 |")
    print("|---|---|---|---|---|---|")
    for name, make, step, threads in [
            (f"diffusion LM ({fresh['hidden']}x{fresh['layers']}, {rows}x{data['max_seq_len']} tokens, 1 thread)",
             lm, lm_step, 1),
            (f"codec decoder ({dec_cfg['d_model']}x{dec_cfg['layers']}, batch {dec_cfg['batch_size']}, 2 threads)",
             decoder, dec_step, 2)]:
        torch.set_num_threads(threads)
        t32, l32 = _time(make, step, args.steps, "none")
        t16, l16 = _time(make, step, args.steps, "bf16")
        print(f"| {name} | {t32:.3f} | {t16:.3f} | {t32 / t16:.2f} | {l32:.4f} | {l16:.4f} |")


if __name__ == "__main__":
    main()
