"""What transcribing with Whisper (CTranslate2) does to torch's speed in the same process:
the vocoder (Griffin-Lim, 48 iterations, 2 s of speech) and a 183x256x768 matmul timed
before and after one transcription, with Whisper in this process (2 threads, 1 thread)
and in a child process (`WhisperRecognizer`'s default). Each case in a fresh process.

    .venv/bin/python benchmarks/asr_isolation.py
"""

from __future__ import annotations

import subprocess
import sys
import time


def case(isolated: bool, threads: int) -> tuple[float, float, float, float]:
    import torch

    from omni_model.tokenizers.mel import MelConfig, mel_to_waveform
    from pipelines.evaluation.asr import WhisperRecognizer

    torch.set_num_threads(2)
    mel = torch.rand(1, 128, 200)
    a, b = torch.randn(183, 256), torch.randn(256, 768)

    def timed() -> tuple[float, float]:
        for _ in range(3):
            mel_to_waveform(mel, MelConfig(), 48)
        start = time.perf_counter()
        for _ in range(10):
            mel_to_waveform(mel, MelConfig(), 48)
        vocoder = (time.perf_counter() - start) / 10
        start = time.perf_counter()
        for _ in range(300):
            a @ b
        return vocoder, (time.perf_counter() - start) / 300

    before = timed()
    recognizer = WhisperRecognizer(threads=threads, isolated=isolated)
    recognizer.transcribe(mel_to_waveform(mel, MelConfig(), 48)[0], 16000)
    after = timed()
    recognizer.close()
    return (*before, *after)


def main() -> int:
    if len(sys.argv) == 3:  # one case, in its own process
        print(*case(sys.argv[1] == "isolated", int(sys.argv[2])))
        return 0
    print(f"{'Whisper':24} {'vocoder before':>15} {'after':>8} {'ratio':>6} {'matmul before':>14} {'after':>8} {'ratio':>6}")
    for where, threads in (("in-process", 2), ("in-process", 1), ("isolated", 2)):
        out = subprocess.run([sys.executable, __file__, where, str(threads)], capture_output=True, text=True,
                             check=True).stdout.split()
        v0, m0, v1, m1 = map(float, out[-4:])
        print(f"{where + f', {threads} threads':24} {v0 * 1e3:12.1f} ms {v1 * 1e3:5.1f} ms {v1 / v0:5.2f}x "
              f"{m0 * 1e6:11.0f} us {m1 * 1e6:5.0f} us {m1 / m0:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
