#!/usr/bin/env bash
# Make the environment the OpenCLIP side of bench/loader.py runs in (as a subprocess).
#
#   bash bench/openclip_env.sh [DIR]        # default DIR: /tmp/clip-train-openclip-venv
#
# open_clip_train pins webdataset<=0.2.86 and its tar grouping fails on webdataset 1.x
# (KeyError: 'fname'), so it cannot share our .venv. This venv sees our .venv's packages
# (the same torch, torchvision, open_clip, PIL: a .pth file appends that site-packages to
# sys.path) and installs only what differs ahead of them: webdataset 0.2.86 and pandas
# (open_clip_train.data imports it). Idempotent; prints the venv's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-/tmp/clip-train-openclip-venv}"
MAIN_PY="$ROOT/.venv/bin/python"
[ -x "$MAIN_PY" ] || { echo "error: $MAIN_PY not found (run 'make install' first)" >&2; exit 2; }
MAIN_SITE="$("$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
BASE_PY="$("$MAIN_PY" -c 'import sys; print(sys._base_executable)')"

if [ ! -x "$DIR/bin/python" ]; then
    "$BASE_PY" -m venv "$DIR"
fi
SITE="$("$DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$MAIN_SITE" > "$SITE/_clip_train_main_venv.pth"
if ! "$DIR/bin/python" -c 'import webdataset, pandas, sys; sys.exit(webdataset.__version__ != "0.2.86")' 2>/dev/null; then
    "$DIR/bin/pip" install -q "webdataset==0.2.86" pandas
fi
"$DIR/bin/python" -c 'import webdataset, open_clip_train.data, torch; assert webdataset.__version__ == "0.2.86", webdataset.__file__' >&2
echo "$DIR/bin/python"
