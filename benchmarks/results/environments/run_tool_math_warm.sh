#!/bin/bash
# tool_math on SmolLM2 from an SFT warm start, 3 seeds: tool-call demonstrations on the train split
# of examples/tool_math.yaml's own task (4-digit + and *), SFT (examples/tool_math_sft.yaml), then
# examples/tool_math.yaml from the SFT run for 10 steps, 100 held-out problems, no checkpoints, as
# run_tool_math.sh does. Each RL run's step-0 evaluation is "after SFT, before RL" (env/tool_use_frac,
# accuracy); its last one is "after RL". About an hour on the 2-core CPU machine.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
out=${OUT:-runs/env}  # OUT=DIR puts the runs elsewhere
py=${PYTHON:-.venv/bin/python}  # the project venv (run_tool_math.sh ran an activated one as python)
mkdir -p "$out"
# 320 train problems, two records each (the call's turn, the answer's turn after the tool's real
# result; each runs the sandbox once): SFT's 12 steps x 16 use 192 of the 640; 64 test problems for the held-out NLL only
"$py" -m posttrain.cli demos examples/tool_math.yaml --out "$out/tool_math_demos.jsonl" --split train \
  --limit 320 --force
"$py" -m posttrain.cli demos examples/tool_math.yaml --out "$out/tool_math_demos_val.jsonl" --split test \
  --limit 64 --force
"$py" -m posttrain.cli sft examples/tool_math_sft.yaml \
  data.path="$out/tool_math_demos.jsonl" data.validation_path="$out/tool_math_demos_val.jsonl" trainer.threads=1 \
  --output-dir "$out/tool_math_sft" > "$out/tool_math_sft.log" 2>&1
for seed in 0 1 2; do
  "$py" -m posttrain.cli rl examples/tool_math.yaml \
    model.name="$out/tool_math_sft" trainer.steps=10 trainer.eval_every=0 \
    trainer.seed=$seed trainer.eval_problems=100 trainer.checkpoint_every=0 trainer.threads=1 \
    --output-dir "$out/tool_math_warm_s$seed" > "$out/tool_math_warm_s$seed.log" 2>&1
done
echo done > "$out/tool_math_warm.done"
