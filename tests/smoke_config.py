"""The tiny training config tests share: configs/demo.yaml shrunk to train in a fraction of a
second."""

TINY = [
    "model.embed_dim=32",
    "model.image.img_size=32",
    "model.image.patch_size=8",
    "model.image.width=48",
    "model.image.depth=2",
    "model.image.heads=2",
    "model.text.context_length=32",
    "model.text.width=48",
    "model.text.heads=2",
    "model.text.layers=2",
    "train.batch_size=16",
    "train.log_every=2",
    "data.num_workers=0",
    "data.shuffle_buffer=50",
    "optim.warmup_steps=2",
    "run.progress=false",
    "eval.batch_size=64",
]


def make_cfg(synth_dir, run_root, name, *extra):
    """A tiny demo Config on the synthetic set at `synth_dir`, writing runs under `run_root`."""
    from clip_train.config import load_config

    return load_config(
        "configs/demo.yaml",
        [
            f"data.train={synth_dir}/train",
            f"data.zeroshot={synth_dir}/zeroshot",
            f"data.retrieval={synth_dir}/retrieval",
            f"run.output_dir={run_root}",
            f"run.name={name}",
            *TINY,
            *extra,
        ],
    )
