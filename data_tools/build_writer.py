"""The builders' write engine: `Item`s -> numbered shards in one folder, resumably.

Items are dealt to shards by position (shard i holds items [i*n, (i+1)*n) minus the bad
ones), each shard is written to a temporary name and renamed when complete, and
`.clip-data-build.json` in the output folder records the completed shards, so a rerun with the
same inputs and options skips them (a resumable build) and a rerun with different ones is
refused unless `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_tools.build_encode import EncodeOptions, encode_in_worker, encode_item, init_worker
from data_tools.build_inputs import MAX_LISTED, Item
from data_tools.errors import DataError
from data_tools.io import write_json_atomic
from data_tools.shards import ShardWriter
from data_tools.tario import FieldLoader

log = logging.getLogger("data_tools.build")  # the name users filter the builders' log on

BUILD_STATE = ".clip-data-build.json"
BUILD_FORMAT = "clip-train-build/1"


@dataclass
class SplitResult:
    """What `write_split` left in one output folder."""

    path: Path
    prefix: str
    shards: list[str]
    shard_counts: list[int]
    written: int
    skipped: Counter
    bad: list[dict[str, str]]
    resumed_shards: int
    inputs: int

    def to_json(self, root: Path) -> dict[str, Any]:
        return {
            "path": os.path.relpath(self.path, root),
            "samples": self.written,
            "shards": self.shards,
            "shard_counts": self.shard_counts,
            # sizes let readers trust the counts without opening a tar (data_tools.counts)
            "shard_bytes": [os.path.getsize(self.path / n) for n in self.shards],
            "skipped": dict(self.skipped),
        }


def _fingerprint(items: Sequence[Item], prefix: str, per_shard: int, opts: EncodeOptions) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([BUILD_FORMAT, prefix, per_shard, asdict(opts)]).encode())
    for it in items:
        h.update(it.ident().encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def _our_shards(out: Path, prefix: str) -> list[Path]:
    pat = re.compile(rf"{re.escape(prefix)}-(\d{{6}})\.tar")
    return sorted(p for p in out.glob(f"{prefix}-*.tar") if pat.fullmatch(p.name))


def write_split(
    items: Sequence[Item],
    out_dir: str | Path,
    prefix: str,
    *,
    samples_per_shard: int,
    opts: EncodeOptions,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    desc: str | None = None,
) -> SplitResult:
    """Encode `items` into `out_dir/{prefix}-NNNNNN.tar`, resumably (see module docstring)."""
    from data_tools.progress import progress as progress_bar

    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory (choose another --output)")
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(items) // samples_per_shard)
    fp = _fingerprint(items, prefix, samples_per_shard, opts)
    state_path = out / BUILD_STATE
    state: dict[str, Any] | None = None
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = None
    existing = _our_shards(out, prefix)
    if state is not None and state.get("fingerprint") != fp:
        if not overwrite:
            raise DataError(
                f"{out} holds shards of a different build (inputs or options changed); "
                "pass --overwrite to replace them, or choose another --output"
            )
        state = None
    if state is None:
        if existing and not overwrite:
            raise DataError(
                f"{out} already holds {prefix}-*.tar shards that this build did not "
                "make; pass --overwrite to replace them, or choose another --output"
            )
        for p in existing:
            p.unlink()
        state = {"format": BUILD_FORMAT, "fingerprint": fp, "shards": {}}
    for tmp in out.glob(f".{prefix}-*.tar.tmp"):  # left by a killed run
        tmp.unlink()
    done: dict[str, Any] = state["shards"]
    writer = ShardWriter(out, prefix, 1)

    def complete(i: int) -> bool:
        d = done.get(str(i))
        return d is not None and (d["samples"] == 0 or writer.final_path(i).is_file())

    todo = [i for i in range(n_shards) if not complete(i)]
    resumed = n_shards - len(todo)
    if resumed:
        log.info("%s: %d of %d shards already complete, resuming", out, resumed, n_shards)
    work = [(i, items[i * samples_per_shard : (i + 1) * samples_per_shard]) for i in todo]
    flat = (it for _, chunk in work for it in chunk)
    n_work = sum(len(c) for _, c in work)
    pool = None
    if num_workers > 0 and n_work:
        pool = mp.get_context("spawn").Pool(num_workers, initializer=init_worker, initargs=(opts,))
        results: Iterator[tuple[dict[str, Any] | None, str, str]] = pool.imap(
            encode_in_worker, flat, chunksize=4
        )
    else:
        fields = FieldLoader()
        results = (encode_item(it, opts, fields) for it in flat)
    try:
        with progress_bar(
            total=len(items),
            initial=len(items) - n_work,
            unit="img",
            enabled=progress,
            desc=desc or prefix,
        ) as bar:
            for i, chunk in work:
                skipped: Counter = Counter()
                bad: list[dict[str, str]] = []
                with ShardWriter(out, prefix, samples_per_shard=len(chunk) + 1, start_index=i) as w:
                    for it in chunk:
                        sample, reason, detail = next(results)
                        bar.update(1)
                        if sample is None:
                            skipped[reason] += 1
                            if len(bad) < MAX_LISTED:
                                bad.append(
                                    {
                                        "key": it.key,
                                        "reason": reason,
                                        "source": it.source,
                                        "detail": detail,
                                    }
                                )
                            continue
                        w.write(sample)
                done[str(i)] = {"samples": w.num_samples, "skipped": dict(skipped), "bad": bad}
                write_json_atomic(state_path, state)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for p in _our_shards(out, prefix):  # from an earlier, larger build of the same inputs
        if int(p.stem.rsplit("-", 1)[1]) >= n_shards:
            p.unlink()
    shards, counts, skipped_all, bad_all = [], [], Counter(), []
    for i in range(n_shards):
        d = done[str(i)]
        skipped_all.update(d["skipped"])
        bad_all.extend(d["bad"][: max(0, MAX_LISTED - len(bad_all))])
        if d["samples"]:
            shards.append(writer.final_path(i).name)
            counts.append(d["samples"])
    return SplitResult(
        out, prefix, shards, counts, sum(counts), skipped_all, bad_all, resumed, len(items)
    )
