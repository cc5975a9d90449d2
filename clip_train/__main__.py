"""`python -m clip_train ...` (what `accelerate launch -m clip_train` and torchrun run)."""

import sys

from clip_train.cli import main

sys.exit(main())
