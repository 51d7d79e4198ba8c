"""``posttrain rm CONFIG [key=value ...] [--output-dir DIR]``: train a Bradley–Terry reward model.

Also imports ``posttrain.rewards.learned`` so the reward types ``reward_model`` and ``judge``
are available to ``posttrain rl`` configs (the import is light: no torch).
"""

from __future__ import annotations


def _rm(args) -> int:
    from posttrain.config import load_config
    from posttrain.trainers.reward_model import RMConfig, train_reward_model

    cfg = load_config(args.config, args.overrides, cls=RMConfig)
    train_reward_model(cfg, output_dir=args.output_dir, quiet=False)
    return 0


def add_commands(sub) -> None:
    import posttrain.rewards.learned  # noqa: F401  (registers reward_model / judge)

    rm = sub.add_parser(
        "rm",
        help="train a Bradley-Terry reward model on preference pairs (JSONL prompt/chosen/rejected)",
        description="Train a reward model: scalar head on a causal LM, loss -log sigmoid(r_chosen - r_rejected). "
                    "Example: posttrain rm examples/rm.yaml model=tiny-random epochs=1",
    )
    rm.add_argument("config", help="YAML config (see examples/rm.yaml)")
    rm.add_argument("overrides", nargs="*", help="overrides, e.g. lr=1e-5 data=prefs.jsonl")
    rm.add_argument("--output-dir", help="output directory (default: a new folder under runs/)")
    rm.set_defaults(func=_rm)
