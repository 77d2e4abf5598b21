"""torch CPU threads in a replica: one thread computes with many, every other with one.

A replica runs torch on several threads: the one that loads the model, the request
parsers (image and speech tokenizers), the model thread (`@serve.batch`) or the step
scheduler, and the decoder of finished requests. torch's thread count is per thread, and
with OpenMP (torch's CPU backend) every thread that computes with more than one keeps a
team of helper threads. Measured on a 2-core machine: once one thread has computed with
two, another thread computing with two runs a 183x256x768 matmul in 257 us instead of
180 and an elementwise op 4x slower; a thread computing with one slows nobody. 16 mixed
requests through the step scheduler took 2.0 s with every thread at two, 1.13 s with
only the scheduler at two (`docs/serving.md`, "Threads").

So the replica loads with one thread, parses and decodes with one, and gives
`deployment.threads` to the single thread that runs the model.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def single_threaded_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A pool whose threads compute with one torch thread each."""
    return model_pool(workers, name, threads=1)


def model_pool(workers: int, name: str, threads: int) -> ThreadPoolExecutor:
    """A pool whose threads compute with `threads` torch threads each."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=torch.set_num_threads,
                              initargs=(threads,))
