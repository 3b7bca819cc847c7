#!/usr/bin/env bash
# The main job: install, then caption the bundled example videos and print where the captions went.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt
python -m pipeline.captioning.caption_colour examples/videos.csv --output outputs/examples_caption.csv "$@"
