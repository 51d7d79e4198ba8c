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

# TRL and what it needs beyond such a machine's torch and transformers, for benchmarks/gpu_vs_trl.sh
# (issue 20, item 7): installed for CPython 3.12 on x86_64 Linux into a staging folder, then packed as
# one xz tarball with a manifest (dist==version per line). pyarrow's wheel alone is 55 MB and the
# carry limit is 64 MiB, so its Flight and S3 libraries, headers, Cython sources and tests are
# dropped (datasets uses none of them; libarrow_substrait stays: pyarrow.lib links it), and so are
# pandas' tests. Versions are this machine's, the ones the CPU benchmarks ran with, except pandas
# (2.3: numpy 1.26 or 2.x, whichever the GPU machine has) and huggingface_hub (transformers 5.17
# needs < 2, datasets >= 1.31).
ver() { python -c "from importlib.metadata import version; print(version('$1'))"; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pip install -q --no-deps --target "$stage" --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all: \
  "trl==$(ver trl)" "accelerate==$(ver accelerate)" "datasets==$(ver datasets)" "pyarrow==$(ver pyarrow)" \
  "dill==$(ver dill)" "multiprocess==$(ver multiprocess)" "xxhash==$(ver xxhash)" "fsspec==$(ver fsspec)" \
  'pandas==2.3.*' 'python-dateutil==2.9.*' six pytz tzdata 'huggingface_hub>=1.31,<2'
( cd "$stage" && rm -rf bin pyarrow/include pyarrow/includes pyarrow/tests pyarrow/src pandas/tests \
  && rm -f pyarrow/libarrow_flight* pyarrow/libarrow_s3* pyarrow/_flight* pyarrow/_s3fs* pyarrow/libarrow_python_flight* \
     pyarrow/libarrow_python.so pyarrow/libarrow_python.so.*.*.* pyarrow/*.pyx pyarrow/*.pxd pyarrow/*.pxi \
  && find . -name __pycache__ -prune -exec rm -rf {} + )
python - "$stage" > gpu_wheels/trl-py312.txt <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from gpu_bundle import write_manifest
print(write_manifest(sys.argv[1]), end="")
PY
tar -cJf gpu_wheels/trl-py312.tar.xz -C "$stage" .
cat gpu_wheels/trl-py312.txt
du -sh gpu_wheels gpu_wheels/trl-py312.tar.xz
