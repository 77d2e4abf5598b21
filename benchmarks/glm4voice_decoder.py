"""GLM-4-Voice's speech decoder (`omni_model.tokenizers.glm4voice`) at the released size:
real-time factor at 1, 4 and 16 utterances a batch, against decoding the same utterances
one at a time in the same run (`decode(..., batch_size=b)` against `batch_size=1`; the
decoder's default is the whole batch on a GPU and one at a time on a CPU, from these
figures); the chunked mode's time to first audio against one pass; memory.

    .venv/bin/python benchmarks/glm4voice_decoder.py [--batches 1,4,16] [--seconds 3]
        [--repeats 1] [--threads 2] [--device cpu|cuda] [--folder DECODER] [--out FILE.json]

Without `--folder` the model is built from the released configuration (flow: 512-wide
6-layer block conformer over 16,384 codes, a U-Net of [256, 256] channels with 4
Transformer blocks a level and 12 mid blocks, 10 guided Euler steps; HiFT with 512 base
channels; 131.6 M parameters) with random weights: the cost of a pass does not depend on
the weights. Utterances are `--seconds` long on average (lengths drawn between 0.6 and 1.4
times that, seeded), the codes random. RTF = decoding wall time / seconds of audio made
(below 1: faster than real time). Float32; on a GPU each timing is synchronised.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omni_model.tokenizers.glm4voice.config import DecoderConfig  # noqa: E402
from omni_model.tokenizers.glm4voice.decoder import WEB_DEMO_BLOCKS, GLM4VoiceDecoder  # noqa: E402
from omni_model.tokenizers.glm4voice.flow import FlowConfig, FlowModel  # noqa: E402
from omni_model.tokenizers.glm4voice.hift import HiFTConfig, HiFTVocoder  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def released(device: str) -> GLM4VoiceDecoder:
    torch.manual_seed(0)
    config = DecoderConfig(flow=FlowConfig(), hift=HiFTConfig())
    return GLM4VoiceDecoder(config, FlowModel(config.flow).to(device), HiFTVocoder(config.hift).to(device))


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=3.0, help="mean utterance length")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folder", help="a glm-4-voice-decoder folder instead of the released shape")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decoder = GLM4VoiceDecoder.from_folder(args.folder, args.device) if args.folder else released(args.device)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("flow", decoder.flow),
                                                                            ("hift", decoder.hift))}
    rate = decoder.config.flow.input_frame_rate
    vocab = decoder.config.flow.vocab_size
    g = torch.Generator().manual_seed(1)
    most = max(int(b) for b in args.batches.split(","))
    lengths = [max(1, round(args.seconds * rate * (0.6 + 0.8 * torch.rand((), generator=g).item())))
               for _ in range(most)]
    codes = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    decoder.decode(codes[:1])  # warm-up (allocator, oneDNN kernels)
    rows = []
    print(f"{cpu_name()} | torch {torch.__version__} | {args.threads} threads | {args.device} | float32 | "
          f"flow {params['flow'] / 1e6:.1f} M + HiFT {params['hift'] / 1e6:.1f} M params "
          f"({sum(params.values()) * 4 / 2**20:.0f} MiB)")
    print(f"{'batch':>5} {'audio s':>8} {'batched s':>10} {'RTF':>6} {'one-by-one s':>13} {'RTF':>6} {'speed-up':>9}")
    for b in (int(x) for x in args.batches.split(",")):
        batch = codes[:b]
        audio = sum(len(w) for w in decoder.decode(batch, batch_size=1)) / decoder.sample_rate
        together = min(timed(lambda: decoder.decode(batch, batch_size=b), args.device) for _ in range(args.repeats))
        alone = min(timed(lambda: decoder.decode(batch, batch_size=1), args.device) for _ in range(args.repeats))
        rows.append({"batch": b, "audio_s": audio, "batched_s": together, "rtf_batched": together / audio,
                     "one_by_one_s": alone, "rtf_one_by_one": alone / audio, "speedup": alone / together})
        print(f"{b:>5} {audio:>8.1f} {together:>10.2f} {together / audio:>6.3f} {alone:>13.2f} "
              f"{alone / audio:>6.3f} {alone / together:>8.2f}x")
    longest = max(codes, key=len)
    one_pass = min(timed(lambda: decoder.decode([longest]), args.device) for _ in range(args.repeats))
    stream = decoder.stream(longest)
    first = timed(lambda: next(stream), args.device)
    rest = timed(lambda: list(stream), args.device)
    print(f"chunked ({len(longest)} codes, blocks {WEB_DEMO_BLOCKS[:2]}...): first audio after {first:.2f} s, "
          f"all after {first + rest:.2f} s; one pass {one_pass:.2f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory of this process: {peak:.0f} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "cpu": cpu_name(), "threads": args.threads, "device": args.device, "params": params,
            "seconds": args.seconds, "rows": rows, "stream": {"codes": len(longest), "first_audio_s": first,
                                                             "all_s": first + rest, "one_pass_s": one_pass},
            "peak_rss_mib": peak}, indent=2) + "\n")


if __name__ == "__main__":
    main()
