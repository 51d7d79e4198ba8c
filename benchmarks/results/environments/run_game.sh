#!/bin/bash
# TextArena Guess-the-Number (1..20) on SmolLM2: examples/textarena.yaml, 20 steps, 100 held-out games
cd "$(git rev-parse --show-toplevel)"  # this session ran it from a frozen worktree of commit 187b0a7
mkdir -p runs/env
for seed in 0; do
  python -m posttrain.cli rl examples/textarena.yaml \
    trainer.steps=20 trainer.eval_every=10 trainer.seed=$seed trainer.eval_problems=100 trainer.checkpoint_every=0 trainer.threads=1 \
    --output-dir runs/env/game_s$seed > runs/env/game_s$seed.log 2>&1
done
echo done > runs/env/game.done
