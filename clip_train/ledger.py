"""The sample ledger (`run.ledger=true`): which samples each process trained on, step by step.

`RUN_DIR/ledger/rank_R.jsonl` holds one line per step, `{"step", "epoch", "keys"}`: the keys of
the batch process R trained on in that step. It answers "which samples did this model see, and
how often", and checks a resume: lines after the checkpoint a run resumes from are cut, as in
metrics.jsonl, so the files of a resumed run read as those of one run (the files of processes a
resume on fewer processes no longer has end at the checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.io import write_text_atomic


class SampleLedger:
    def __init__(self, run_dir: Path, rank: int, enabled: bool) -> None:
        self.dir = run_dir / "ledger"
        self.path = self.dir / f"rank_{rank}.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int, world_size: int, is_main: bool) -> None:
        """Drop the lines after `step`: each process in its own file, the main process also in
        those of processes this run does not have (nobody else writes them)."""
        if not (self.enabled and self.dir.is_dir()):
            return
        paths = [self.path] if self.path.is_file() else []
        if is_main:
            paths += [
                p
                for p in sorted(self.dir.glob("rank_*.jsonl"))
                if p.stem.removeprefix("rank_").isdigit()
                and int(p.stem.removeprefix("rank_")) >= world_size
            ]
        for path in paths:
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step
            ]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "keys": list(keys)}) + "\n")
