"""Promotion: a paired bootstrap on held-out ROC-AUC, and the checks that gate a promotion."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from moderation_worker.loop import promotion
from moderation_worker.loop.promotion import Comparison, compare, decide, weighted_roc_auc
from moderation_worker.tools.evaluation import bootstrap_ci


def data(n: int = 200, positives: int | None = None, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Labels, a separating candidate, a random production model."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=np.int64)
    y[rng.choice(n, n // 2 if positives is None else positives, replace=False)] = 1
    good = np.where(y == 1, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n))
    noise = rng.uniform(0.0, 1.0, n)
    return y, good, noise


def comparison(**changes: object) -> Comparison:
    base = Comparison(
        n=180,
        positives=60,
        metric="roc_auc",
        candidate=0.91,
        production=0.84,
        delta=0.07,
        delta_low=0.03,
        delta_high=0.11,
        candidate_f1=0.8,
        production_f1=0.7,
        delta_f1_low=0.01,
        delta_f1_high=0.2,
        confidence=0.95,
        resamples=1000,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_clearly_better_candidate_is_promoted() -> None:
    y, good, noise = data()
    result = compare(y, good, noise, 0.5, 0.5)
    assert result.candidate == 1.0 and 0.3 < result.production < 0.7
    assert 0 < result.delta_low <= result.delta <= result.delta_high
    assert result.n == 200 and result.positives == 100 and result.resamples == 1000
    decision = decide(result)
    assert decision.promote and all(decision.checks.values())
    assert decision.reason.endswith("Promote.") and "200 held-out labels" in decision.reason


def test_identical_scores_give_a_zero_delta_and_no_promotion() -> None:
    y, _, noise = data()
    result = compare(y, noise, noise, 0.5, 0.5)
    assert result.delta == result.delta_low == result.delta_high == 0.0
    assert result.delta_f1_low == result.delta_f1_high == 0.0
    decision = decide(result)
    assert not decision.promote and decision.checks["beats_production"] is False
    assert "not above the minimum gain" in decision.reason
    assert decision.reason.endswith("Keep production.")


def test_a_worse_candidate_is_not_promoted() -> None:
    y, good, noise = data()
    result = compare(y, noise, good, 0.5, 0.5)
    assert result.delta_high < 0
    assert not decide(result).promote


def test_a_gain_inside_the_interval_is_not_enough() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    base = np.clip(0.5 + 0.15 * (2 * y - 1) + rng.normal(0, 0.3, 120), 0, 1)
    slightly = np.clip(base + rng.normal(0, 0.05, 120), 0, 1)
    result = compare(y, slightly, base, 0.5, 0.5)
    assert result.delta_low <= 0 <= result.delta_high
    assert not decide(result).promote


def test_the_bootstrap_is_paired() -> None:
    """A rank-preserving shift changes no resample's AUC, so the paired interval is [0, 0]."""
    y, _, noise = data(n=300, seed=5)
    shifted = noise / 2 + 0.25  # same order, different values
    result = compare(y, shifted, noise, 0.5, 0.5, seed=11)
    assert result.delta_low == result.delta_high == 0.0
    assert result.delta_f1_low == result.delta_f1_high == 0.0  # threshold 0.5 <-> 0.5 on both
    # ... while each model's own AUC does vary across resamples: an unpaired interval of the
    # difference could not be [0, 0].
    alone = bootstrap_ci(y, noise, 0.5, n_resamples=200, seed=11)["roc_auc"]
    assert alone["high"] - alone["low"] > 0.05
    # F1 moves with the threshold (here both flag the same rows only at matching thresholds).
    different = compare(y, shifted, noise, 0.3, 0.5, seed=11)
    assert different.delta_f1_high - different.delta_f1_low > 0


def test_auc_equals_sklearn_with_ties_and_on_every_resample() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    tied = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 400), 0, 1), 1)  # 11 values only
    coarse = rng.integers(0, 3, 400) / 2.0
    result = compare(y, tied, coarse, 0.5, 0.5)
    assert result.candidate == pytest.approx(roc_auc_score(y, tied), abs=1e-9)
    assert result.production == pytest.approx(roc_auc_score(y, coarse), abs=1e-9)
    for _ in range(20):
        idx = rng.integers(0, 400, 400)
        weights = np.bincount(idx, minlength=400)
        for p in (tied, coarse):
            assert weighted_roc_auc(y, p, weights)[0] == pytest.approx(
                roc_auc_score(y[idx], p[idx]), abs=1e-9
            )
    rows = weighted_roc_auc(y, tied, np.stack([np.ones(400), y, 1 - y]))
    assert rows[0] == pytest.approx(roc_auc_score(y, tied)) and np.isnan(rows[1:]).all()


def test_f1_is_at_each_models_own_threshold() -> None:
    y, good, noise = data(seed=2)
    result = compare(y, good, noise, 0.7, 0.4)
    assert result.candidate_f1 == pytest.approx(f1_score(y, good >= 0.7))
    assert result.production_f1 == pytest.approx(f1_score(y, noise >= 0.4))
    assert result.delta_f1_low > 0
    all_negative = compare(y, good, noise, 1.0, 0.4)  # nothing reaches 1.0 but an exact 1.0
    assert all_negative.candidate_f1 == pytest.approx(f1_score(y, good >= 1.0, zero_division=0))


def test_the_seed_makes_it_reproducible() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 150)
    a, b = rng.uniform(0, 1, 150), np.clip(0.2 * y + rng.uniform(0, 0.8, 150), 0, 1)
    first = compare(y, b, a, 0.5, 0.5, seed=1, resamples=300)
    assert compare(y, b, a, 0.5, 0.5, seed=1, resamples=300) == first
    same = compare(y, b, a, np.float32(0.5), np.float64(0.5), seed=1, resamples=np.int64(300))
    assert same == first  # numpy scalars, as a model or a settings file may hand them over
    other = compare(y, b, a, 0.5, 0.5, seed=2, resamples=300)
    assert (other.delta_low, other.delta_high) != (first.delta_low, first.delta_high)
    assert other.delta == first.delta  # the point estimate does not depend on the seed


def test_single_class_resamples_are_skipped_and_counted() -> None:
    y, good, noise = data(n=30, positives=1)
    result = compare(y, good, noise, 0.5, 0.5, resamples=1000)
    # P(no positive in a resample) = (29/30)**30 ~ 0.36
    assert 550 < result.resamples < 750


def test_wider_confidence_gives_a_wider_interval() -> None:
    y, good, noise = data(n=80, seed=9)
    narrow = compare(y, good, noise, 0.5, 0.5, confidence=0.5)
    wide = compare(y, good, noise, 0.5, 0.5, confidence=0.99)
    assert wide.delta_low < narrow.delta_low and wide.delta_high > narrow.delta_high


def test_resampling_in_chunks_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large held-out sets are resampled a chunk at a time to bound memory; same result."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 201)
    a, b = rng.uniform(0, 1, 201), np.clip(0.2 * y + rng.uniform(0, 0.8, 201), 0, 1)
    whole = compare(y, b, a, 0.5, 0.5, resamples=100)
    monkeypatch.setattr(promotion, "_CHUNK_CELLS", 7 * 201)  # 15 chunks, the last one short
    assert compare(y, b, a, 0.5, 0.5, resamples=100) == whole


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (([0, 1, 1], [0.1, 0.2], [0.1, 0.2, 0.3], 0.5, 0.5), {}, "length mismatch"),
        (([0, 1], [0.1, 1.2], [0.1, 0.2], 0.5, 0.5), {}, r"p_candidate must be probabilities"),
        (([0, 1], [0.1, 0.2], [-0.1, 0.2], 0.5, 0.5), {}, r"p_production must be probabilities"),
        (([0, 1], [0.1, float("nan")], [0.1, 0.2], 0.5, 0.5), {}, "non-finite"),
        (([0, 1], [0.1, 0.2], [float("inf"), 0.2], 0.5, 0.5), {}, "non-finite"),
        (([1, 1], [0.1, 0.2], [0.1, 0.2], 0.5, 0.5), {}, "both classes"),
        (([0, 0], [0.1, 0.2], [0.1, 0.2], 0.5, 0.5), {}, "both classes"),
        (([0, 2], [0.1, 0.2], [0.1, 0.2], 0.5, 0.5), {}, "only 0 and 1"),
        (([[0, 1]], [[0.1, 0.2]], [[0.1, 0.2]], 0.5, 0.5), {}, "1-D"),
        (([0, 1], [0.1, 0.2], [0.1, 0.2], 1.5, 0.5), {}, "t_candidate"),
        (([0, 1], [0.1, 0.2], [0.1, 0.2], 0.5, -0.1), {}, "t_production"),
        (([0, 1], [0.1, 0.2], [0.1, 0.2], 0.5, 0.5), {"resamples": 0}, "resamples"),
        (([0, 1], [0.1, 0.2], [0.1, 0.2], 0.5, 0.5), {"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_inputs_raise(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compare(*args, **kwargs)


def test_comparison_to_dict_is_rounded_json() -> None:
    y, good, noise = data(seed=8)
    result = compare(y, good, noise, 0.5, 0.5)
    out = orjson.loads(orjson.dumps(result.to_dict()))
    assert out["metric"] == "roc_auc" and out["n"] == 200 and out["resamples"] == 1000
    assert out["production"] == round(result.production, 4)
    assert all(v == round(v, 4) for v in out.values() if isinstance(v, float))


def test_decide_needs_a_holdout_comparison() -> None:
    decision = decide(None)
    assert not decision.promote and decision.checks == {"holdout_size": False}
    assert "no held-out" in decision.reason


def test_too_few_held_out_rows_block_a_promotion() -> None:
    decision = decide(comparison(n=30, positives=15))
    assert not decision.promote
    assert decision.checks == {
        "holdout_size": False,
        "holdout_classes": True,
        "beats_production": True,
    }
    assert "Only 30 held-out labels, 50 needed." in decision.reason


@pytest.mark.parametrize("positives", [5, 175])
def test_too_few_of_a_class_block_a_promotion(positives: int) -> None:
    decision = decide(comparison(positives=positives))
    assert not decision.promote and decision.checks["holdout_classes"] is False
    assert f"{positives} positives and {180 - positives} negatives" in decision.reason


def test_the_gain_must_clear_min_gain() -> None:
    assert decide(comparison(delta_low=0.03), min_gain=0.02).promote
    blocked = decide(comparison(delta_low=0.03), min_gain=0.05)
    assert not blocked.promote and "+0.030 is not above the minimum gain +0.050" in blocked.reason


def test_every_failed_check_has_its_own_sentence() -> None:
    decision = decide(comparison(n=20, positives=2, delta_low=-0.1))
    assert not any(decision.checks.values())
    assert "Only 20 held-out labels" in decision.reason
    assert "2 positives and 18 negatives" in decision.reason
    assert "not above the minimum gain" in decision.reason


def test_a_worse_trusted_comparison_blocks_a_winning_holdout() -> None:
    trusted = comparison(n=100, positives=40, candidate=0.80, production=0.85, delta=-0.05)
    decision = decide(comparison(), trusted=trusted)
    assert not decision.promote
    assert decision.checks["beats_production"] and decision.checks["trusted_not_worse"] is False
    assert "100 trusted labels" in decision.reason and "poisoned" in decision.reason
    assert decide(comparison(), trusted=trusted, trusted_tolerance=0.06).promote
    assert decide(comparison(), trusted=comparison(delta=0.0)).promote


def test_a_thin_trusted_set_is_not_checked_and_says_so() -> None:
    thin = comparison(n=15, positives=3, delta=-0.3)
    decision = decide(comparison(), trusted=thin)
    assert decision.promote and "trusted_not_worse" not in decision.checks
    assert "Trusted labels not checked" in decision.reason


def test_a_poisoned_flood_is_caught_by_the_trusted_labels() -> None:
    """End to end: the candidate learned flipped labels; new held-out labels are flipped too."""
    y, good, noise = data(n=300, seed=12)
    trusted_y, new_y = y[:150], 1 - y[150:]  # the flood flipped the new labels
    candidate = 1 - good  # trained on the flood
    holdout = compare(new_y, candidate[150:], noise[150:], 0.5, 0.5)
    trusted = compare(trusted_y, candidate[:150], noise[:150], 0.5, 0.5)
    decision = decide(holdout, trusted=trusted)
    assert decision.checks["beats_production"]  # the poisoned held-out labels agree with it
    assert not decision.promote and decision.checks["trusted_not_worse"] is False


def test_decide_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        decide(comparison(), min_holdout=0)
    with pytest.raises(ValueError):
        decide(comparison(), trusted_tolerance=-0.1)


def test_decision_to_dict_is_json() -> None:
    decision = decide(comparison())
    out = orjson.loads(orjson.dumps(decision.to_dict()))
    assert out == {"promote": True, "reason": decision.reason, "checks": decision.checks}
