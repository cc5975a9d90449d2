"""Regenerate tests/golden/smoke_loss.json: the per-step loss of a tiny seeded run.

Run after an intended change of numerics (model init, loss, schedule, data order), and say why in
the commit:  .venv/bin/python tests/golden/make_golden.py
"""

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

STEPS = 8


def smoke_losses(tmp: Path) -> list:
    from smoke_config import TINY
    from smoke_config import make_cfg as _make_cfg

    from clip_train.train import train
    from data_tools.synth import SynthConfig, write_synth

    write_synth(
        tmp / "synth",
        SynthConfig(
            seed=0,
            train_samples=200,
            zeroshot_per_class=2,
            retrieval_samples=40,
            image_size=32,
            samples_per_shard=64,
        ),
    )
    cfg = _make_cfg(
        tmp / "synth",
        tmp / "runs",
        "golden",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "eval.at_end=false",
        "export.at_end=false",
    )
    assert all(o in TINY for o in ("train.batch_size=16", "data.num_workers=0"))
    train(cfg)
    lines = (tmp / "runs" / "golden" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        losses = smoke_losses(Path(tmp))
    (HERE / "smoke_loss.json").write_text(
        json.dumps({"steps": STEPS, "loss": losses}, indent=1) + "\n"
    )
    print(losses)
