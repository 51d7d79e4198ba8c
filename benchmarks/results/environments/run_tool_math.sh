#!/bin/bash
# tool_math on SmolLM2, 3 seeds: examples/tool_math.yaml with 2-digit + and - (4-digit + and * is at 0.00
# before training: no reward signal), 20 steps, 100 held-out problems, no checkpoints
cd "$(git rev-parse --show-toplevel)"  # this session ran it from a frozen worktree of commit 187b0a7
mkdir -p runs/env
for seed in 0 1 2; do
  python -m posttrain.cli rl examples/tool_math.yaml \
    task.digits=2 'task.ops=[+, -]' trainer.steps=20 trainer.eval_every=10 \
    trainer.seed=$seed trainer.eval_problems=100 trainer.checkpoint_every=0 trainer.threads=1 \
    --output-dir runs/env/tool_math_s$seed > runs/env/tool_math_s$seed.log 2>&1
done
echo done > runs/env/tool_math.done
