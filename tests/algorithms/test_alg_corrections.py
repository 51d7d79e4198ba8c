"""Train-inference mismatch corrections (behaviour vs old) by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import CORRECTIONS, CorrectionConfig, CorrectionInput, mismatch_metrics

L = math.log


def make(ratios, mask=None) -> CorrectionInput:
    """Token ratios pi_old / mu given directly: behaviour = 0, old = log(ratio)."""
    old = torch.tensor([[L(r) for r in row] for row in ratios], dtype=torch.float64)
    m = torch.ones_like(old) if mask is None else torch.tensor(mask, dtype=torch.float64)
    return CorrectionInput(behaviour_logprobs=torch.zeros_like(old), old_logprobs=old, mask=m)


def run(name, x, **cfg):
    return CORRECTIONS.get(name)(x, CorrectionConfig(**cfg))


def run_named(name, x, **cfg):
    """As ``run``, with ``name`` in the config too, so the config's own validation runs."""
    return CORRECTIONS.get(name)(x, CorrectionConfig(name=name, **cfg))


def flat(t):
    return t.flatten().tolist()


def test_tis_token():
    # w = min(ratio, C = 2): 0.5, 1.5, 2 (capped from 3); padding -> weight 0, mask 0
    out = run("tis_token", make([[0.5, 1.5], [3.0, 1.0]], mask=[[1, 1], [1, 0]]))
    assert flat(out.weights) == pytest.approx([0.5, 1.5, 2.0, 0.0])
    assert flat(out.mask) == [1.0, 1.0, 1.0, 0.0]
    assert out.metrics["correction/truncated_frac"].item() == pytest.approx(1 / 3)  # 3 capped of 3 real tokens


def test_tis_sequence():
    # seq 0: 0.5 * 1.5 = .75 ; seq 1: 3 * (padding ignored) = 3 -> capped at 2
    out = run("tis_sequence", make([[0.5, 1.5], [3.0, 7.0]], mask=[[1, 1], [1, 0]]))
    assert flat(out.weights) == pytest.approx([0.75, 0.75, 2.0, 0.0])
    # one of the three real tokens (seq 1's) sits at the cap
    assert out.metrics["correction/truncated_frac"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["mis_token", "icepop"])
def test_mis_token_masks_outside_window(name):
    # window [1/2, 2] by default: 0.4 masked, 0.5 kept, 1.5 kept, 2.5 masked ; kept weights = ratio
    out = run(name, make([[0.4, 0.5, 1.5, 2.5]]))
    assert flat(out.mask) == [0.0, 1.0, 1.0, 0.0]
    assert flat(out.weights) == pytest.approx([0.0, 0.5, 1.5, 0.0])
    assert out.metrics["correction/masked_frac"].item() == pytest.approx(0.5)
    # explicit window [0.3, 5]
    out = run(name, make([[0.4, 2.5]]), threshold_low=0.3, threshold_high=5.0)
    assert flat(out.mask) == [1.0, 1.0]


def test_mis_sequence():
    # seq 0: 1.2 * 1.5 = 1.8 in [.5, 2] -> kept with weight 1.8 ; seq 1: 1.5 * 1.5 = 2.25 -> dropped
    out = run("mis_sequence", make([[1.2, 1.5], [1.5, 1.5]]))
    assert flat(out.mask) == [1.0, 1.0, 0.0, 0.0]
    assert flat(out.weights) == pytest.approx([1.8, 1.8, 0.0, 0.0])


def test_reject_by_mean_kl():
    # delta = log(old / mu) per token. seq 0: ratios 1.1, 1/1.1 ; seq 1: 2, 2
    # k1_t = log mu - log old = -delta: seq 0 mean (-ln 1.1 + ln 1.1) / 2 = 0 ; seq 1 mean -ln 2 = -.693
    # k2_t = delta^2 / 2: seq 0 = (ln 1.1)^2 / 2 = .004542 ; seq 1 = (ln 2)^2 / 2 = .240227
    # k3_t = e^delta - 1 - delta: seq 0 = (.1 - ln 1.1 + 1/1.1 - 1 + ln 1.1) / 2 = .004545 ; seq 1 = 1 - ln 2 = .306853
    x = make([[1.1, 1 / 1.1], [2.0, 2.0]])
    for name in ("reject_k1", "reject_k2", "reject_k3"):
        out = run(name, x, kl_threshold=0.01)
        assert flat(out.mask) == [1.0, 1.0, 0.0, 0.0], name
        assert flat(out.weights) == [1.0, 1.0, 0.0, 0.0], name
    # k2 of seq 0 is .004542: a threshold of .004 rejects it, .005 keeps it
    assert flat(run("reject_k2", x, kl_threshold=0.004).mask)[:2] == [0.0, 0.0]
    assert flat(run("reject_k2", x, kl_threshold=0.005).mask)[:2] == [1.0, 1.0]
    # k3 seq 0 = .0045455 vs k2 .0045415: .004544 separates them
    assert flat(run("reject_k3", x, kl_threshold=0.004544).mask)[:2] == [0.0, 0.0]
    assert flat(run("reject_k2", x, kl_threshold=0.004544).mask)[:2] == [1.0, 1.0]


def test_corrections_carry_no_gradient():
    old = torch.zeros(2, 3, requires_grad=True)
    x = CorrectionInput(behaviour_logprobs=torch.full((2, 3), -0.1), old_logprobs=old, mask=torch.ones(2, 3))
    for name in CORRECTIONS.names():
        out = run(name, x)
        assert not out.weights.requires_grad and not out.mask.requires_grad, name
        assert out.weights.shape == (2, 3)


def test_mismatch_metrics_by_hand():
    # token ratios old/mu: 1, 2, 0.5, padding ; delta = ln r
    # k1 = -delta: 0, -.693147, .693147 -> mean 0 ; k3 = r - 1 - ln r: 0, .306853, .193147 -> mean .166667
    x = make([[1.0, 2.0], [0.5, 9.0]], mask=[[1, 1], [1, 0]])
    m = mismatch_metrics(x.behaviour_logprobs, x.old_logprobs, x.mask)
    assert m["mismatch/kl_k1"].item() == pytest.approx(0.0, abs=1e-9)
    assert m["mismatch/kl_k3"].item() == pytest.approx((0.306853 + 0.193147) / 3, abs=1e-6)
    # quantiles of {0.5, 1, 2} (linear interpolation): p05 = .5 + .1 * .5 = .55, p50 = 1, p95 = 1 + .9 * 1 = 1.9
    assert m["mismatch/ratio_p05"].item() == pytest.approx(0.55)
    assert m["mismatch/ratio_p50"].item() == pytest.approx(1.0)
    assert m["mismatch/ratio_p95"].item() == pytest.approx(1.9)
    assert m["mismatch/ratio_max"].item() == pytest.approx(2.0)
    empty = mismatch_metrics(x.behaviour_logprobs, x.old_logprobs, torch.zeros(2, 2))
    assert all(v.item() == 0.0 for v in empty.values())


# ---------------------------------------------------------------- verl's sequence-level rejection modes
# Three sequences, token ratios r = pi_old / mu (padding at t = 2 of A and C), delta = ln r:
#   A: 2, 0.5 | pad     delta  .693147, -.693147
#   B: 1.5, 1.5, 1      delta  .405465,  .405465, 0
#   C: 1, 0.25 | pad    delta  0,       -1.386294
# k1 = -delta:          A -.693147, .693147      B -.405465, -.405465, 0    C 0, 1.386294
# k2 = delta^2 / 2:     A .240227, .240227       B .082201, .082201, 0      C 0, .960906
# k3 = r - 1 - delta:   A .306853, .193147       B .094535, .094535, 0      C 0, .636294
SEQ_RATIOS = [[2.0, 0.5, 1.0], [1.5, 1.5, 1.0], [1.0, 0.25, 1.0]]
SEQ_MASK = [[1, 1, 0], [1, 1, 1], [1, 1, 0]]
SEQ_STATS = {  # per sequence A, B, C: sum / mean / max of the rows above
    "seq_sum_k1": [0.0, -0.810930, 1.386294],
    "seq_sum_k2": [0.480453, 0.164402, 0.960906],
    "seq_sum_k3": [0.5, 0.189070, 0.636294],
    "seq_mean_k1": [0.0, -0.270310, 0.693147],  # B: -.810930 / 3 tokens
    "seq_mean_k2": [0.240227, 0.054801, 0.480453],
    "seq_mean_k3": [0.25, 0.063023, 0.318147],
    "seq_max_k2": [0.240227, 0.082201, 0.960906],
    "seq_max_k3": [0.306853, 0.094535, 0.636294],
}


def test_sequence_statistics_by_hand():
    from posttrain.algorithms.base import SEQ_REJECT_MODES
    from posttrain.algorithms.corrections import sequence_divergence

    assert set(SEQ_STATS) == set(SEQ_REJECT_MODES) and set(SEQ_REJECT_MODES) <= set(CORRECTIONS.names())
    x = make(SEQ_RATIOS, mask=SEQ_MASK)
    for mode, expected in SEQ_STATS.items():
        assert flat(sequence_divergence(x, mode)) == pytest.approx(expected, abs=1e-6), mode


@pytest.mark.parametrize(
    "mode, cfg, kept",
    [
        # k1: keep iff log L <= S <= log U. Default [0.5, 2]: +-.693147 -> B (-.81) and C (1.39) out
        ("seq_sum_k1", {}, [1, 0, 0]),
        ("seq_sum_k1", {"rs_threshold_high": 2.5}, [1, 1, 0]),  # +-.916291: B in
        # asymmetric window [0.5, 5] on exp(S) = mu(o) / pi_old(o) (verl's direction): log [-.693147, 1.609438]
        # B: mu/pi_old = 1 / 2.25 = .444 < .5 -> out; C: mu/pi_old = 4 <= 5 -> in. Bounding pi_old/mu instead
        # would keep B (2.25) and drop C (.25).
        ("seq_sum_k1", {"rs_threshold_low": 0.5, "rs_threshold_high": 5.0}, [1, 0, 1]),
        ("seq_mean_k1", {}, [1, 0, 0]),  # verl's geo window [.999, 1.001]: only A's exact 0
        ("seq_mean_k1", {"rs_threshold_low": 0.8, "rs_threshold_high": 2.5}, [1, 0, 1]),  # [-.223, .916]
        # k2 / k3: keep iff S <= U
        ("seq_sum_k2", {}, [1, 1, 0]),  # default ln 2 = .693147: C .960906 out
        ("seq_sum_k2", {"rs_threshold_high": 0.2}, [0, 1, 0]),
        ("seq_sum_k3", {}, [1, 1, 1]),  # .5, .189, .636 <= .693
        ("seq_sum_k3", {"rs_threshold_high": 0.55}, [1, 1, 0]),
        ("seq_sum_k3", {"rs_threshold_high": 0.3}, [0, 1, 0]),
        ("seq_mean_k2", {}, [0, 0, 0]),  # default .01: every sequence here is far off
        ("seq_mean_k2", {"rs_threshold_high": 0.25}, [1, 1, 0]),
        ("seq_mean_k2", {"rs_threshold_high": 0.1}, [0, 1, 0]),
        ("seq_mean_k3", {}, [0, 0, 0]),
        ("seq_mean_k3", {"rs_threshold_high": 0.3}, [1, 1, 0]),  # A's mean .25 is in, its sum .5 and max .307 are not
        ("seq_mean_k3", {"rs_threshold_high": 0.2}, [0, 1, 0]),
        ("seq_max_k2", {}, [1, 1, 1]),  # default 2.5
        ("seq_max_k2", {"rs_threshold_high": 0.5}, [1, 1, 0]),
        ("seq_max_k2", {"rs_threshold_high": 0.1}, [0, 1, 0]),
        ("seq_max_k3", {}, [1, 1, 1]),
        ("seq_max_k3", {"rs_threshold_high": 0.5}, [1, 1, 0]),
        ("seq_max_k3", {"rs_threshold_high": 0.3}, [0, 1, 0]),
    ],
)
def test_sequence_rejection_by_hand(mode, cfg, kept):
    out = run_named(mode, make(SEQ_RATIOS, mask=SEQ_MASK), **cfg)
    expected = [[k * m for m in row] for k, row in zip(kept, SEQ_MASK)]
    assert out.mask.tolist() == expected
    assert out.weights.tolist() == expected  # weight 1 on kept tokens, 0 elsewhere


def test_sequence_rejection_metrics_by_hand():
    out = run("seq_sum_k3", make(SEQ_RATIOS, mask=SEQ_MASK), rs_threshold_high=0.55)  # keeps A, B; drops C
    assert out.metrics["correction/seq_stat_mean"].item() == pytest.approx((0.5 + 0.189070 + 0.636294) / 3, abs=1e-6)
    assert out.metrics["correction/seq_stat_max"].item() == pytest.approx(0.636294, abs=1e-6)
    assert out.metrics["correction/rejected_seq_frac"].item() == pytest.approx(1 / 3)
    assert out.metrics["correction/masked_frac"].item() == pytest.approx(2 / 7)  # C's 2 of the 7 real tokens


def _dirty(ratios, mask):
    """The same input with NaN / inf / -inf in both log-prob tensors wherever mask == 0."""
    x = make(ratios, mask=mask)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
    off = x.mask == 0
    fill = garbage[torch.arange(int(off.sum())) % 3]
    old, behaviour = x.old_logprobs.clone(), x.behaviour_logprobs.clone()
    old[off], behaviour[off] = fill, fill.flip(0)
    return x, CorrectionInput(behaviour_logprobs=behaviour, old_logprobs=old, mask=x.mask)


@pytest.mark.parametrize("name, cfg", [(m, {"rs_threshold_high": 3.0 if m.endswith("k1") else 0.3})
                                       for m in SEQ_STATS]
                         + [(m, {"batch_normalize": True}) for m in ("tis_token", "tis_sequence", "mis_token",
                                                                    "mis_sequence")])
def test_masked_garbage_changes_nothing(name, cfg):
    # SEQ example plus a 4th, fully masked row: garbage at every masked position
    ratios, mask = SEQ_RATIOS + [[1.0, 1.0, 1.0]], SEQ_MASK + [[0, 0, 0]]
    clean, dirty = _dirty(ratios, mask)
    a, b = run_named(name, clean, **cfg), run_named(name, dirty, **cfg)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.mask, b.mask), name
    assert torch.isfinite(b.weights).all() and torch.all(b.weights[clean.mask == 0] == 0)
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        assert torch.equal(a.metrics[key], b.metrics[key]), (name, key)
        assert torch.isfinite(b.metrics[key]), (name, key)


# ---------------------------------------------------------------- batch-normalised IS weights
def test_batch_normalize_token_level():
    # truncated weights .5, 1.5, 2 (3 capped) over 3 real tokens: mean 4/3 -> .375, 1.125, 1.5
    out = run("tis_token", make([[0.5, 1.5], [3.0, 1.0]], mask=[[1, 1], [1, 0]]), batch_normalize=True)
    assert flat(out.weights) == pytest.approx([0.375, 1.125, 1.5, 0.0])
    assert out.metrics["correction/batch_norm_factor"].item() == pytest.approx(4 / 3)
    assert out.metrics["correction/weight_mean"].item() == pytest.approx(1.0)
    # the truncated share is counted before normalising (1.5 is below the cap 2 but was capped from 3)
    assert out.metrics["correction/truncated_frac"].item() == pytest.approx(1 / 3)
    # without the flag: the raw truncated weights, no factor
    raw = run("tis_token", make([[0.5, 1.5], [3.0, 1.0]], mask=[[1, 1], [1, 0]]))
    assert flat(raw.weights) == pytest.approx([0.5, 1.5, 2.0, 0.0]) and "correction/batch_norm_factor" not in raw.metrics


def test_batch_normalize_sequence_level_counts_each_sequence_once():
    # sequence weights .5 x 1.5 = .75 (2 tokens), min(3, 2) = 2, 1.2; mean over the 3 sequences 3.95 / 3 = 1.316667
    out = run("tis_sequence", make([[0.5, 1.5], [3.0, 1.0], [1.2, 1.0]], mask=[[1, 1], [1, 0], [1, 0]]),
              batch_normalize=True)
    f = 3.95 / 3
    assert flat(out.weights) == pytest.approx([0.75 / f, 0.75 / f, 2.0 / f, 0.0, 1.2 / f, 0.0])  # .569620, 1.518987, .911392
    assert out.metrics["correction/batch_norm_factor"].item() == pytest.approx(f)
    # a token mean would weigh the 2-token sequence twice: (2 x .569620 + 1.518987 + .911392) / 4 = .892405, not 1
    assert out.metrics["correction/weight_mean"].item() == pytest.approx(0.892405, abs=1e-6)


@pytest.mark.parametrize("name", ["mis_token", "icepop"])
def test_batch_normalize_masked_token_is_over_kept_tokens(name):
    # window [.5, 2]: .4 and 2.5 masked; kept .6, 1.2, mean .9 -> .666667, 1.333333
    out = run(name, make([[0.4, 0.6], [1.2, 2.5]]), batch_normalize=True)
    assert flat(out.mask) == [0.0, 1.0, 1.0, 0.0]
    assert flat(out.weights) == pytest.approx([0.0, 0.6 / 0.9, 1.2 / 0.9, 0.0])
    assert out.metrics["correction/batch_norm_factor"].item() == pytest.approx(0.9)


def test_batch_normalize_masked_sequence_is_over_kept_sequences():
    # 1.2 x 1.5 = 1.8 kept, 1.5 x 1.5 = 2.25 dropped, .8 kept: mean (1.8 + .8) / 2 = 1.3
    out = run("mis_sequence", make([[1.2, 1.5], [1.5, 1.5], [0.8, 1.0]], mask=[[1, 1], [1, 1], [1, 0]]),
              batch_normalize=True)
    assert flat(out.weights) == pytest.approx([1.8 / 1.3, 1.8 / 1.3, 0.0, 0.0, 0.8 / 1.3, 0.0])  # 1.384615, .615385
    assert flat(out.mask) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_batch_normalize_is_over_the_rows_it_is_given():
    """The caller decides what "the batch" is: a half batch is normalised to its own mean."""
    whole = run("tis_token", make([[0.5], [1.5]]), batch_normalize=True)
    assert flat(whole.weights) == pytest.approx([0.5, 1.5])  # mean already 1
    halves = [run("tis_token", make([[r]]), batch_normalize=True) for r in (0.5, 1.5)]
    assert [flat(h.weights)[0] for h in halves] == pytest.approx([1.0, 1.0])  # each row alone is its own batch


def test_batch_normalize_with_nothing_kept_leaves_the_weights():
    out = run("tis_token", make([[2.0, 0.5]], mask=[[0, 0]]), batch_normalize=True)
    assert flat(out.weights) == [0.0, 0.0] and out.metrics["correction/batch_norm_factor"].item() == 1.0


# ---------------------------------------------------------------- configuration errors, before any work
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"name": "seq_sum_k2", "rs_threshold_low": 0.1}, "algorithm.correction.rs_threshold_low"),
        ({"name": "seq_max_k3", "rs_threshold_high": 0.0}, "algorithm.correction.rs_threshold_high"),
        ({"name": "seq_sum_k1", "rs_threshold_high": 0.8}, "algorithm.correction.rs_threshold_low/high"),  # L = 1.25
        ({"name": "seq_mean_k1", "rs_threshold_low": 1.2, "rs_threshold_high": 2.0},
         "algorithm.correction.rs_threshold_low/high"),
        ({"name": "tis_token", "rs_threshold_high": 2.0}, "algorithm.correction.rs_threshold_low/high"),
        ({"name": "reject_k1", "batch_normalize": True}, "algorithm.correction.batch_normalize"),
        ({"name": "seq_sum_k1", "batch_normalize": True}, "algorithm.correction.batch_normalize"),
    ],
)
def test_bad_rejection_or_normalisation_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        CorrectionConfig(**kwargs)


def test_bad_window_is_refused_on_a_direct_call_too():
    # no name in the config (a direct call): the mode's own bounds are checked before anything is computed
    with pytest.raises(ValueError, match="rs_threshold_low/high"):
        run("seq_sum_k1", make([[1.0]]), rs_threshold_high=0.8)


def test_yaml_keys_reach_the_correction():
    from posttrain.config import load_config

    cfg = load_config(overrides=["model.name=tiny-random", "algorithm.correction.name=seq_max_k2",
                                 "algorithm.correction.rs_threshold_high=0.1"])
    out = CORRECTIONS.get(cfg.algorithm.correction.name)(make(SEQ_RATIOS, mask=SEQ_MASK), cfg.algorithm.correction)
    assert [row[0] for row in out.mask.tolist()] == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"algorithm\.correction\.rs_threshold_low"):
        load_config(overrides=["model.name=tiny-random", "algorithm.correction.name=seq_mean_k3",
                               "algorithm.correction.rs_threshold_low=0.001"])


def test_new_entries_are_listed_with_their_paper():
    from posttrain.algorithms.catalog import catalog

    rows = {r["name"]: r for r in catalog() if r["kind"] == "correction"}
    for mode in SEQ_STATS:
        assert "arXiv:2512.01374" in rows[mode]["paper"] and mode in rows[mode]["summary"], mode
