#!/usr/bin/env bash
# Prepares gpu_wheels/ (git-ignored) on a CPU machine for benchmarks/gpu_check.sh on a GPU
# machine without network: pure-Python/abi3 wheels of what posttrain imports beyond torch and
# transformers, and SmolLM2-135M's config and tokenizer (no weights). Carry gpu_wheels/ along.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu_wheels/smollm2-config
pip download -q --no-deps -d gpu_wheels rich markdown-it-py mdurl pygments psutil tensorboard protobuf absl-py \
  markdown pytest pluggy iniconfig packaging
src=$(python -c "from posttrain.models.loading import _gguf_cached, resolve_alias; print(_gguf_cached(resolve_alias('smollm2-135m-instruct')))")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
  [ -f "$src/$f" ] && cp "$src/$f" gpu_wheels/smollm2-config/
done
du -sh gpu_wheels
