"""OpenCLIP's side of bench/time_to_quality.py; runs in the bench venv (webdataset 0.2.86).

    python bench/_openclip_train.py MODEL_CONFIG.json -- <open_clip_train.main arguments>

Registers the model config (our sizes as an open_clip config named after the file) and hands
the remaining arguments to `open_clip_train.main.main` unchanged: the real trainer, its data
pipeline, schedule, optimizer groups and logging.
"""

from __future__ import annotations

import sys

import open_clip
from open_clip_train.main import main

if __name__ == "__main__":
    config, sep, *rest = sys.argv[1:]
    assert sep == "--", "usage: _openclip_train.py CONFIG.json -- ARGS"
    open_clip.add_model_config(config)
    main(rest)
