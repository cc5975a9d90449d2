"""The image side of an evaluation pass: worker count, and batches to features fast on any device.

On CUDA a batch goes to the device whole, under bf16 autocast (what the trainer uses). On the
CPU a batch is cut into chunks of `CPU_CHUNK` images, run by a few threads at once, each with a
share of torch's intra-op threads (one each on a small machine). Why: a ViT forward is ~100
small ops; run with OpenMP over every core, each op ends at a barrier where all threads wait for
the slowest, and on a shared machine a neighbour's process holds one of them every time (the
zero-shot pass ran 1.5-1.8x slower that way, docs/benchmarks.md). Independent chunks only meet
once per batch; a chunk's activations also fit in cache and reuse freed heap memory instead of
page-faulting fresh pages in for every op. Each chunk is the same computation on fewer rows, so
features equal the whole batch's to float rounding (checked to 1e-6 in tests), and they do not
depend on the thread count: the chunk size alone fixes which rows meet in one matrix product.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from clip_eval._common import autocast
from clip_eval.encoder import Encoder

CPU_CHUNK = 32  # images per CPU forward: fast at every size we measured (16-64), exact to 1e-7
MAX_DEFAULT_WORKERS = 4


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """Loader workers when none are given: min(4, CPUs // 2), so 1 on 2 CPUs, 0 on one.

    Decoding in workers overlaps it with the model; half the CPUs are left to the model's own
    threads, because on 2 CPUs 2 workers were slower than 1 (they take the model's cores).
    """
    return min(MAX_DEFAULT_WORKERS, available_cpus() // 2)


@contextlib.contextmanager
def image_features(
    encoder: Encoder, device: torch.device, cpu_chunk: int | None = CPU_CHUNK
) -> Iterator[Callable[[Tensor], Tensor]]:
    """`encode(images) -> float32 features` for one pass; torch's thread count is restored after.

    `cpu_chunk=None` runs every batch whole on the calling thread (the plain loop), e.g. for an
    encoder that is not safe to call from several threads at once.
    """
    if device.type != "cpu" or cpu_chunk is None:
        yield lambda images: _whole(encoder, images, device)
        return
    if cpu_chunk < 1:
        raise ValueError(f"cpu_chunk must be >= 1 or None, got {cpu_chunk}")
    threads = torch.get_num_threads()
    pools: dict[int, ThreadPoolExecutor] = {}

    def encode(images: Tensor) -> Tensor:
        chunks = images.split(cpu_chunk)
        streams = min(threads, len(chunks))
        if streams <= 1:
            return torch.cat([_chunk(encoder, c) for c in chunks])
        if streams not in pools:
            # Made on first use, after the loader has forked its workers: no fork with threads
            # alive.
            pools[streams] = ThreadPoolExecutor(
                streams,
                thread_name_prefix="clip-eval-image",
                initializer=torch.set_num_threads,
                initargs=(max(1, threads // streams),),
            )
        return torch.cat(list(pools[streams].map(lambda c: _chunk(encoder, c), chunks)))

    try:
        yield encode
    finally:
        for pool in pools.values():
            pool.shutdown()
        torch.set_num_threads(threads)  # the pool threads' setting is process-wide for MKL


def _whole(encoder: Encoder, images: Tensor, device: torch.device) -> Tensor:
    images = images.to(device, non_blocking=True)
    with autocast(device):
        return encoder.encode_image(images).float()


def _chunk(encoder: Encoder, images: Tensor) -> Tensor:
    # Grad mode is per thread: a pool thread must switch it off itself.
    with torch.inference_mode():
        return encoder.encode_image(images).float()
