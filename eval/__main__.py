"""`python -m clip_eval ...` is `clip-eval ...`."""

import sys

from clip_eval.cli import main

sys.exit(main())
