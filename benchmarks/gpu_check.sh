#!/usr/bin/env bash
# The CUDA check, one prepared run on a GPU machine (under 10 minutes):
#   1. the `gpu` tests (tests/gpu: learner + hf engine on CUDA, learning, resume);
#   2. `posttrain bench` on CUDA: SmolLM2-135M's architecture with RANDOM weights (the real
#      weights are not on that machine), 8 x 8 completions of 64 tokens, and 32 x 8 of 256;
#   3. a short `posttrain rl examples/arithmetic.yaml` on CUDA through the CLI, same random
#      weights: it checks the whole run path (evaluation, checkpoint, summary); its accuracy
#      means nothing.
# Figures go to $OUT (the device tool's folder) or benchmarks/results/gpu_check/.
# Needs: torch with CUDA and transformers there; what else posttrain imports is installed from
# wheels carried in gpu_wheels/ (pure-Python or abi3: rich, psutil, tensorboard, pytest, ...),
# and gpu_wheels/smollm2-config/ holds SmolLM2's config.json and tokenizer (no weights).
# Prepare on a CPU machine: benchmarks/gpu_prepare.sh. vLLM's GPU wheel is too large to carry,
# so this covers the hf engine only.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
log() { echo "[$(date +%T)] $*" | tee -a "$out/log.txt"; }

log "environment"
{ python -V; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$out/log.txt"

log "installing what is missing from gpu_wheels/"
python - <<'PY' > /tmp/missing.txt
import importlib.util
need = {"rich": "rich", "markdown_it": "markdown-it-py", "mdurl": "mdurl", "pygments": "pygments", "psutil": "psutil",
        "tensorboard": "tensorboard", "google.protobuf": "protobuf", "absl": "absl-py", "markdown": "markdown",
        "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "packaging": "packaging"}
def absent(mod):
    try:
        return importlib.util.find_spec(mod) is None
    except ModuleNotFoundError:
        return True
print(" ".join(dist for mod, dist in need.items() if absent(mod)))
PY
missing=$(cat /tmp/missing.txt)
log "missing: ${missing:-nothing}"
[ -n "$missing" ] && pip install -q --no-index --no-deps --find-links gpu_wheels $missing 2>&1 | tail -3 | tee -a "$out/log.txt"

log "gpu tests"
timeout 180 python -m pytest tests/gpu -m gpu -p no:cacheprovider -q -rA -s 2>&1 | tail -40 | tee "$out/gpu_tests.txt"

log "random-weight SmolLM2-135M architecture"
python - <<'PY' 2>&1 | tee -a "$out/log.txt"
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained("gpu_wheels/smollm2-config")
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.save_pretrained("/tmp/smollm2-random")
AutoTokenizer.from_pretrained("gpu_wheels/smollm2-config").save_pretrained("/tmp/smollm2-random")
print("saved", sum(p.numel() for p in model.parameters()) / 1e6, "M parameters (random weights)")
PY

for shape in "8 8 64" "32 8 256"; do
  set -- $shape
  log "posttrain bench on CUDA: $1 prompts x $2 completions, $3 new tokens"
  timeout 100 python -m posttrain.cli bench examples/arithmetic.yaml model.name=/tmp/smollm2-random trainer.device=cuda \
    rollout.num_prompts=$1 rollout.num_completions=$2 rollout.max_new_tokens=$3 trainer.micro_batch_size=64 \
    --steps 5 --json "$out/bench_cuda_$1x$2x$3.json" 2>&1 | tail -25 | tee -a "$out/log.txt"
done

log "posttrain rl on CUDA (random weights: the run path, not accuracy)"
timeout 100 python -m posttrain.cli rl examples/arithmetic.yaml model.name=/tmp/smollm2-random trainer.device=cuda \
  trainer.steps=10 trainer.eval_problems=64 --output-dir /tmp/rl-cuda 2>&1 | tail -20 | tee -a "$out/log.txt"
cp /tmp/rl-cuda/summary.json "$out/rl_cuda_summary.json" 2>/dev/null
python - <<'PY' 2>&1 | tee -a "$out/log.txt"
import json, statistics
rows = [json.loads(l) for l in open("/tmp/rl-cuda/metrics.jsonl")]
for k in ("time/step_s", "time/gen_s", "time/learn_s", "time/sync_s"):
    print(k, "median", round(statistics.median(r[k] for r in rows), 3))
PY
log "done"
