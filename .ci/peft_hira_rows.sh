#!/usr/bin/env bash
# PEFT's own HiRA test rows (tests/test_custom_models.py of the pinned peft source distribution), run against this
# repository's tuner: the plugin imports hira first, so PEFT's HIRA type is ours, and fails the run if the rows did
# not go through hira.HiraModel. Expected: 747 passed, 57 skipped (as for stock PEFT 0.21.2).
set -euo pipefail
cd "$(dirname "$0")/.."
PEFT_VERSION=$(python -c "import peft; print(peft.__version__)")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python -m pip install -q -r requirements-peft-tests.txt
python -m pip download -q --no-deps --no-binary :all: "peft==${PEFT_VERSION}" -d "$WORK"
tar xzf "$WORK/peft-${PEFT_VERSION}.tar.gz" -C "$WORK"
SRC="$WORK/peft-${PEFT_VERSION}"
touch "$SRC/tests/__init__.py"  # the sdist's tests use relative imports
cd "$SRC"
PYTHONPATH="$OLDPWD/.ci:$OLDPWD" python -m pytest -q -c /dev/null --rootdir . -p peft_rows_plugin -p no:warnings \
    tests/test_custom_models.py -k "hira and not shira"
