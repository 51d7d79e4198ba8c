import json
import random

import pytest
import torch

SUBJECTS = ["movie", "book", "meal", "song", "trip", "game", "show", "hotel", "phone", "class", "park", "car"]


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield


def write_good_bad(path, n=64, seed=0):
    """Separable preferences: the chosen answer says 'good', the rejected one 'bad'."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            s = rng.choice(SUBJECTS)
            f.write(json.dumps({"prompt": f"How was the {s}?", "chosen": f"The {s} was good.",
                                "rejected": f"The {s} was bad."}) + "\n")
    return path


@pytest.fixture
def good_bad():
    return write_good_bad


@pytest.fixture(scope="session")
def trained_rm(tmp_path_factory):
    """One tiny reward model trained on the good/bad set, shared by the tests that only read it."""
    from posttrain.trainers.reward_model import RMConfig, train_reward_model

    base = tmp_path_factory.mktemp("rm")
    torch.set_num_threads(1)
    data = write_good_bad(base / "prefs.jsonl")
    cfg = RMConfig(model="tiny-random", data=str(data), lr=1e-3, epochs=2, batch_size=8, eval_fraction=0.25)
    summary = train_reward_model(cfg, output_dir=str(base / "out"), quiet=True)
    return base / "out", summary
