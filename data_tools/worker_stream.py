"""What runs inside each DataLoader worker: read plan -> shuffle buffer -> decode -> batches.

Each logical worker reads its own stream (`data_tools.read_plan`), shuffles raw samples in a
buffer, decodes them into batches (`data_tools.decode`, `data_tools.batching`) and attaches
to each batch its bad-sample report (`data_tools.bad_samples`) and its position
(``_worker``, ``_batch``, ``_emitted``), from which `ShardLoader.state_dict` is built.

The workers outlive a pass: `ShardStream.next_pass` tells them, through shared memory they
inherit, which pass their next iteration reads (torch's persistent workers re-iterate the
dataset they started with). Starting new workers for every epoch would fork the trainer each
time, and its first step after a fork pays a copy-on-write fault for every page it writes
(seconds per epoch for a small model on a CPU).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data_tools.bad_samples import BadSampleLog
from data_tools.batching import Batcher
from data_tools.decode import decode_into
from data_tools.read_plan import ReadPlan, buffer_shuffle, worker_samples
from data_tools.tario import FieldLoader, RawSample, ReadMode

log = logging.getLogger("data_tools.loader")  # the name users filter the loader's log on


class ShardStream(IterableDataset):
    """One rank's share of the data; each (logical) worker yields finished batches."""

    def __init__(
        self,
        plan: ReadPlan,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
        view_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        uint8_images: bool = False,
    ) -> None:
        super().__init__()
        self.uint8_images = uint8_images  # pixels, normalised by the consumer
        self.plan = plan
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.view_transform = view_transform  # a second view of every image ("image_2")
        # (passes begun since `plan`, epoch of the latest): workers read it at each iteration
        self._pass = multiprocessing.RawArray("q", [0, plan.epoch])

    def next_pass(self, epoch: int) -> None:
        """Make the next iteration read pass `epoch` from its start (the main process calls
        this before iterating again; workers see it through the shared array)."""
        self._pass[0] += 1
        self._pass[1] = epoch

    def pass_plan(self) -> ReadPlan:
        """The plan of the pass an iteration reads now: `plan` until `next_pass` is called."""
        return self.plan if self._pass[0] == 0 else self.plan.fresh(self._pass[1])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        p = self.pass_plan()
        worker = (physical + p.offset) % p.workers
        start_batches, start_emitted = p.resume[worker] if p.resume else (0, 0)
        report = BadSampleLog(where=f"rank {p.rank} worker {worker}")
        # Sample-split and re-dealt workers read only the headers of samples that are not
        # theirs and load the rest on demand; a resumed worker reads headers only until it
        # catches up.
        mode = ReadMode(read_data=not (p.on_demand or start_emitted > 0))
        raw = worker_samples(p, worker, mode, report)
        stream: Iterable[RawSample] = raw
        if p.shuffle_buffer > 0:
            stream = buffer_shuffle(raw, p.shuffle_buffer, p.worker_rng(worker, "buffer"))
        it = iter(stream)
        # A resumed worker replays, quietly, the samples it had taken before its state.
        # One sample of look-ahead: shard problems met while reading the sample after a
        # batch travel with that batch (so a worker's last batch carries the truncation of
        # its last shard). A resumed worker takes that look-ahead still quietly: its
        # problems went with the batch the state ends on.
        with report.replaying(active=start_emitted > 0):
            emitted = sum(1 for _ in itertools.islice(it, start_emitted))
            if emitted < start_emitted:
                return  # this worker had finished its pass
            nxt = next(it, None)
        mode.read_data = not p.on_demand
        fields = FieldLoader()
        batcher = Batcher(
            p.batch_size, self.image_transform, self.view_transform, self.uint8_images
        )
        batch_index = start_batches
        in_worker = info is not None
        try:
            self._reseed(p, worker, batch_index, in_worker)
            while nxt is not None:
                s, emitted = nxt, emitted + 1
                report.seen += 1
                done = None
                if decode_into(
                    s if s.loaded else fields.load(s),
                    batcher,
                    report,
                    p,
                    need_caption=self.tokenizer is not None,
                ):
                    if batcher.n == p.batch_size:
                        done = self._finish(batcher, worker, batch_index, emitted)
                        batch_index += 1
                        self._reseed(p, worker, batch_index, in_worker)
                nxt = next(it, None)
                if done is not None:
                    done.update(report.take())
                    yield done
            if batcher.n and not p.drop_last:
                done = self._finish(batcher, worker, batch_index, emitted)
                done.update(report.take())
                yield done
            elif report.seen or report.skipped:
                # A tail dropped by drop_last (or trailing bad samples) has no batch to carry
                # its counts: a tally without samples does, and ShardLoader consumes it.
                yield {"_tally": True, "_worker": worker, "_emitted": emitted, **report.take()}
        finally:
            fields.close()
            if report.total_bad:
                log.warning(
                    "%s: skipped %d bad samples of %d read this pass",
                    report.where,
                    report.total_bad,
                    emitted - start_emitted,
                )

    def _finish(self, batcher: Batcher, worker: int, index: int, emitted: int) -> dict[str, Any]:
        p = self.plan
        batch = batcher.finish(self.tokenizer, p.with_label, p.with_json)
        batch.update({"_worker": worker, "_batch": index, "_emitted": emitted})
        return batch

    def _reseed(self, p: ReadPlan, worker: int, batch_index: int, in_worker: bool) -> None:
        seed = p.worker_rng(worker, "augment", batch_index).getrandbits(63)
        reseed = getattr(self.image_transform, "reseed", None)
        if callable(reseed):
            reseed(seed)
        elif in_worker:  # a worker process owns its global RNGs; the main process does not
            random.seed(seed)
            torch.manual_seed(seed)
        reseed_view = getattr(self.view_transform, "reseed", None)
        if callable(reseed_view):  # its own stream: the first view's draws stay as they were
            reseed_view(p.worker_rng(worker, "view-2", batch_index).getrandbits(63))


def worker_init(_: int) -> None:
    """Each worker decodes one image at a time; intra-op threads would only oversubscribe.

    A scheduler signals every process of a job (SLURM: SIGUSR1 before the time limit, SIGTERM on
    preemption); the main process decides what to do and stops its workers itself, and a worker
    killed by one would fail the run. Workers still end with their pass or when the main process
    is gone (torch's watchdog).
    """
    torch.set_num_threads(1)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
