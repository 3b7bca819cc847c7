#!/usr/bin/env bash
# Install what the tests need (.venv with requirements-test.txt, ffmpeg from apt) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements-test.txt
python -c "import mindspore, transformers; print('suite on MindSpore', mindspore.__version__,
                                               'and transformers', transformers.__version__)"
python -m pytest "$@"
