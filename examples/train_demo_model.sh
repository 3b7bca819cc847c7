#!/usr/bin/env bash
# Rebuild the bundled demo model (examples/demo_model) from nothing, on CPU: the synthetic dataset
# (3000 clips, 80/10/10 split), a word tokenizer of its training captions, cross-entropy training
# from scratch (configs/demo/ce.yaml), SCST from that (configs/demo/scst.yaml), and the held-out
# test-split scores of both (outputs/demo/test_{ce,scst}.json) with how often they name the
# clip's colour, shape and motion (outputs/demo/accuracy_{ce,scst}.json). Everything is seeded;
# work files go to outputs/demo. Installs into .venv first, as examples/run_demo.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt
out=outputs/demo
python -m pipeline.datasets.synthetic --output "$out/data" --num_videos 3000 --seed 0
python -m pipeline.training.word_tokenizer "$out/data/train.csv" --output "$out/tokenizer" --vocab_size 96
python -m pipeline.training.train --config configs/demo/ce.yaml
python -m pipeline.training.train --config configs/demo/scst.yaml
for stage in ce scst; do
  python -m pipeline.training.evaluate --references "$out/data/test.csv" --checkpoint "$out/$stage/final" \
    --predictions "$out/test_$stage.csv" --output_json "$out/test_$stage.json" --overwrite
  python -m pipeline.training.synthetic_accuracy --references "$out/data/test.csv" \
    --predictions "$out/test_$stage.csv" --output_json "$out/accuracy_$stage.json"
done
rm -rf examples/demo_model && cp -r "$out/scst/final" examples/demo_model
echo "demo model: examples/demo_model; test scores: $out/test_{ce,scst}.json, accuracy: $out/accuracy_{ce,scst}.json"
