"""Shared fixtures of the vLLM engine tests."""

import pytest

from posttrain.models.tiny import tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny model saved as an HF directory vLLM can load. 2 heads (head_dim 32): vLLM's CPU
    attention has no kernel for the default tiny model's 16."""
    model, tok = tiny_model_and_tokenizer(num_heads=2)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
