#!/usr/bin/env bash
# The smoke set (tests/smoke_tests.txt: captioning, training, msrun, kernels, the version check) on the oldest
# MindSpore that requirements.txt allows, in its own environment (.venv-oldest); tests/run.sh runs the whole
# suite on the newest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/^mindspore>=\([0-9.]*\),.*/\1/p' requirements.txt)
[ -n "$oldest" ] || { echo "cannot read MindSpore's lower bound (mindspore>=X,<Y) from requirements.txt" >&2; exit 1; }
VENV=.venv-oldest PIP_EXTRA="mindspore==$oldest" source scripts/setup_env.sh requirements-test.txt
python -c "import mindspore, transformers; print('smoke set on MindSpore', mindspore.__version__,
                                               'and transformers', transformers.__version__)"
mapfile -t smoke < <(grep -v '^#' tests/smoke_tests.txt)
python -m pytest "${smoke[@]}" "$@"
