#!/usr/bin/env bash
# A TÜLU-style pipeline (catalog 004-4): SFT -> DPO -> RL, each stage starting from the run
# directory of the one before (a run directory is a model: its latest checkpoint).
#
#   bash examples/pipeline.sh runs/pipeline                       # SmolLM2-135M-Instruct, minutes per stage
#   bash examples/pipeline.sh /tmp/p model.name=tiny-random trainer.steps=2 trainer.eval_problems=8   # smoke run
#
# Extra key=value overrides go to every stage (before the stage's own model.name).
set -euo pipefail
out=${1:?usage: pipeline.sh OUT_DIR [key=value ...]}
shift
posttrain sft examples/sft.yaml "$@" --output-dir "$out/1-sft"
posttrain dpo examples/dpo.yaml "$@" model.name="$out/1-sft" --output-dir "$out/2-dpo"
posttrain rl examples/arithmetic.yaml "$@" model.name="$out/2-dpo" --output-dir "$out/3-rl"
for stage in 1-sft 2-dpo 3-rl; do
  python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], 'held-out accuracy', round(s['eval_before']['accuracy'], 3), '->', round(s['eval_after']['accuracy'], 3))" "$out/$stage/summary.json" "$stage"
done
