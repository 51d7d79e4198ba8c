#!/usr/bin/env bash
# posttrain vs TRL on CUDA (issue 20, item 7): one prepared run on a GPU machine, under 10 minutes.
#   1. installs what TRL needs and the machine lacks, from the carried gpu_wheels/trl-py312.tar.xz
#      (benchmarks/gpu_bundle.py; build the bundle here with benchmarks/gpu_prepare.sh);
#   2. builds the SmolLM2-135M and SmolLM2-1.7B architectures with RANDOM weights from
#      gpu_wheels/smollm2-config (the real weights are not on that machine): speed only, and every
#      completion runs to the token cap;
#   3. benchmarks/vs_trl.py --device cuda on the quickstart's shape (8 prompts x 8 completions, up to 64
#      new tokens): the 135M architecture for posttrain, TRL tuned and TRL as shipped; the 1.7B
#      architecture for posttrain and TRL tuned.
# Figures go to $OUT (the device tool's folder) or benchmarks/results/gpu_vs_trl/.
# Carry: gpu_wheels/trl-py312.tar.xz gpu_wheels/trl-py312.txt gpu_wheels/smollm2-config (35 MB).
# Rehearse the whole path on a CPU machine, tiny shapes and no install: REHEARSE=1 bash benchmarks/gpu_vs_trl.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_vs_trl}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
log() { echo "[$(date +%T)] $*" | tee -a "$out/log.txt"; }
if [ "${REHEARSE:-0}" = 1 ]; then
  device=cpu; shape=(--prompts 2 --completions 2 --max-new-tokens 4 --steps 1 --warmup 0); big=smollm2-135m-random
else
  device=cuda; shape=(--prompts 8 --completions 8 --max-new-tokens 64 --steps 3 --warmup 1); big=smollm2-1.7b-random
fi

log "environment (device $device)"
{ python -V; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$out/log.txt"

if [ "$device" = cuda ]; then
  log "installing what TRL needs and this machine lacks"
  python benchmarks/gpu_bundle.py gpu_wheels/trl-py312.tar.xz gpu_wheels/trl-py312.txt 2>&1 | tee -a "$out/log.txt"
fi
python -c "import trl, datasets, pyarrow; from trl import GRPOTrainer; print('trl', trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" \
  2>&1 | tail -3 | tee -a "$out/log.txt" || { log "TRL does not import: stopping"; exit 1; }

log "random-weight SmolLM2 architectures (speed only)"
python - "$device" smollm2-135m-random "$big" <<'PY' 2>&1 | tee -a "$out/log.txt"
import sys
from pathlib import Path
from transformers import AutoConfig, AutoTokenizer
sys.path.insert(0, "benchmarks")
from sweep import build_random_arch

device, names = sys.argv[1], sorted(set(sys.argv[2:]))
base = AutoConfig.from_pretrained("gpu_wheels/smollm2-config")
tokenizer = AutoTokenizer.from_pretrained("gpu_wheels/smollm2-config")
for name in names:
    print((build_random_arch(name, base, tokenizer, Path(f"/tmp/{name}"), device) / "RANDOM_WEIGHTS.txt").read_text())
PY

log "vs_trl on $device: SmolLM2-135M architecture (random weights), posttrain / TRL tuned / TRL as shipped"
timeout 270 python benchmarks/vs_trl.py --device "$device" --model /tmp/smollm2-135m-random "${shape[@]}" \
  --only posttrain --only trl_tuned --only trl --json "$out/vs_trl_135m_random.json" 2>&1 | grep -v Warning | tail -30 | tee -a "$out/log.txt"

log "vs_trl on $device: $big (random weights), posttrain / TRL tuned"
timeout 240 python benchmarks/vs_trl.py --device "$device" --model "/tmp/$big" "${shape[@]}" \
  --only posttrain --only trl_tuned --json "$out/vs_trl_${big%-random}_random.json" 2>&1 | grep -v Warning | tail -30 | tee -a "$out/log.txt"
log "done"
