#!/usr/bin/env bash
# The main job: install, then caption the bundled example videos with the bundled demo model
# (examples/demo_model, a small BLIP-2 trained by examples/train_demo_model.sh) and print where
# the captions went. Extra arguments go to caption_blip2.py (e.g. --bs 2 --num_beams 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt
python -m pipeline.captioning.caption_blip2 examples/videos.csv \
  --pretrained_model_name_or_path examples/demo_model --output outputs/examples_caption.csv "$@"
