#!/usr/bin/env bash
# One-command install: the pinned stack, DeepSpeed (built against the installed torch), the offline artifacts,
# and this repository as an editable package.
set -euo pipefail
PY=${PYTHON:-python3}
$PY -m pip install -r requirements.txt
# DeepSpeed's setup imports torch: build it against the torch installed above (no isolated build env).
$PY -m pip install --no-build-isolation deepspeed==0.19.8
$PY -m pip install --no-deps -r requirements-offline.txt
$PY -m pip install --no-deps --no-build-isolation -e .
