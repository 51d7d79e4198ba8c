"""posttrain: RL post-training of language models, small and readable, from a laptop CPU up."""

import os as _os

# oneDNN, torch's CPU matmul library, keeps a compiled kernel per matmul shape (1024 by default).
# RL batches have ragged shapes (each micro-batch's token count is new), so the cache fills with
# one-off kernels: ~260 MB of resident memory in a SmolLM2-135M run, for no speed. 128 keeps the
# sampler's recurring shapes. oneDNN reads the variable at its first matmul; set it to override.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

__version__ = "0.1.0"

# The Python API (posttrain.api), imported on first use: `import posttrain` (and the CLI) stays
# free of torch until something needs it.
_API = {"train", "load_config", "FunctionReward", "DatasetTask"}


def __getattr__(name: str):
    if name in _API:
        from posttrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
