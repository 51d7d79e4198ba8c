"""posttrain: RL post-training of language models, small and readable, from a laptop CPU up."""

__version__ = "0.1.0"
