"""Threshold policies on toy data where the right answer is worked out by hand."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest

from moderation_worker.threshold_source import read_threshold_file, write_threshold_file
from moderation_worker.thresholds import (
    ThresholdChoice,
    ThresholdPolicy,
    choose_threshold,
    parse_policy,
)

# 8 negatives, 3 positives. By hand, flagging p >= t:
#   t=0.95: TP1 FP0 -> tpr 1/3, F1 0.5
#   t=0.90: TP2 FP0 -> tpr 2/3, fpr 0,    precision 1,   F1 0.8   (best F1)
#   t=0.80: TP2 FP1 -> tpr 2/3, fpr 1/8,  precision 2/3, F1 2/3
#   t=0.70: TP2 FP2 -> tpr 2/3, fpr 1/4,  precision 1/2
#   t=0.65: TP3 FP2 -> tpr 1,   fpr 1/4,  precision 3/5, F1 0.75, J = 0.75 (best Youden)
#   t<=0.60: TP3 FP>=3 -> J <= 0.625
Y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
P = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.95, 0.9, 0.65])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max-f1", ThresholdPolicy("max-f1")),
        (" Youden ", ThresholdPolicy("youden")),
        ("fpr<=0.1", ThresholdPolicy("fpr<=", 0.1)),
        ("FPR <= 0.05", ThresholdPolicy("fpr<=", 0.05)),
        ("precision>=0.9", ThresholdPolicy("precision>=", 0.9)),
        ("precision >= 1e-2", ThresholdPolicy("precision>=", 0.01)),
    ],
)
def test_parse_policy_accepts_the_documented_forms(text: str, expected: ThresholdPolicy) -> None:
    assert parse_policy(text) == expected
    assert parse_policy(str(expected)) == expected  # the string form written to the file parses


@pytest.mark.parametrize(
    "text", ["", "f1", "fpr<0.1", "fpr<=1", "fpr<=0", "fpr<=1.5", "precision>=", "recall>=0.9"]
)
def test_parse_policy_rejects_other_forms_naming_the_accepted_ones(text: str) -> None:
    with pytest.raises(ValueError, match=r"max-f1|\(0, 1\)|not a number"):
        parse_policy(text)


def test_parse_policy_error_lists_accepted_forms() -> None:
    with pytest.raises(ValueError) as err:
        parse_policy("accuracy")
    for form in ("max-f1", "youden", "fpr<=X", "precision>=X"):
        assert form in str(err.value)


@pytest.mark.parametrize(
    ("policy", "threshold", "tpr", "fpr", "precision"),
    [
        ("max-f1", 0.9, 2 / 3, 0.0, 1.0),
        ("youden", 0.65, 1.0, 0.25, 0.6),
        ("fpr<=0.1", 0.9, 2 / 3, 0.0, 1.0),
        ("fpr<=0.125", 0.9, 2 / 3, 0.0, 1.0),  # 0.8 reaches fpr 1/8 but no more recall
        ("fpr<=0.25", 0.65, 1.0, 0.25, 0.6),
        ("precision>=0.6", 0.65, 1.0, 0.25, 0.6),
        ("precision>=0.7", 0.9, 2 / 3, 0.0, 1.0),
    ],
)
def test_policies_pick_the_hand_computed_threshold(
    policy: str, threshold: float, tpr: float, fpr: float, precision: float
) -> None:
    choice = choose_threshold(Y, P, policy)
    assert choice.threshold == threshold
    assert choice.policy == str(parse_policy(policy))
    assert (choice.tpr, choice.fpr, choice.precision) == pytest.approx((tpr, fpr, precision))
    assert choice.recall == choice.tpr
    assert (choice.n, choice.positives, choice.note) == (11, 3, None)


def test_youden_and_max_f1_differ_on_imbalanced_data() -> None:
    f1 = choose_threshold(Y, P, "max-f1")
    youden = choose_threshold(Y, P, "youden")
    assert f1.threshold != youden.threshold
    assert f1.f1 == pytest.approx(0.8) and youden.f1 == pytest.approx(0.75)
    assert youden.tpr - youden.fpr > f1.tpr - f1.fpr


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("target", [0.01, 0.1, 0.3])
def test_fpr_policy_really_meets_the_constraint_on_validation(seed: int, target: float) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    choice = choose_threshold(y, p, f"fpr<={target}")
    flagged = p >= choice.threshold
    fpr = flagged[y == 0].mean()
    assert fpr <= target
    assert choice.fpr == pytest.approx(fpr)
    assert choice.note is None
    # and no threshold in [0, 1] meeting the constraint catches more hateful comments
    best_tpr = max(
        (p[y == 1] >= t).mean() for t in [*np.unique(p), 1.0] if (p[y == 0] >= t).mean() <= target
    )
    assert choice.tpr == pytest.approx(best_tpr)


def test_precision_policy_meets_its_constraint_on_random_data() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.4 * y + 0.6 * rng.random(300), 0, 1)
    choice = choose_threshold(y, p, "precision>=0.9")
    flagged = p >= choice.threshold
    assert y[flagged].mean() >= 0.9
    assert choice.precision == pytest.approx(y[flagged].mean())


def test_unreachable_fpr_picks_strictest_threshold_and_says_so() -> None:
    # a saturated sigmoid: a negative scored exactly 1.0 is flagged at any threshold in [0, 1]
    choice = choose_threshold([0, 1, 0, 0], [1.0, 1.0, 0.2, 0.3], "fpr<=0.1")
    assert choice.threshold == 1.0
    assert choice.fpr == pytest.approx(1 / 3)
    assert choice.note is not None and "fpr<=0.1" in choice.note


def test_unreachable_precision_picks_most_precise_threshold_and_says_so() -> None:
    # best precision anywhere is 2/3 (at 0.6: two hateful, one not)
    choice = choose_threshold([0, 1, 1, 0, 0], [0.9, 0.8, 0.6, 0.3, 0.1], "precision>=0.8")
    assert choice.threshold == 0.6
    assert choice.precision == pytest.approx(2 / 3)
    assert choice.note is not None and "precision>=0.8" in choice.note


def test_threshold_is_never_inf() -> None:
    # scores anti-correlated with labels: the best Youden point is "flag nothing" (roc inf)
    choice = choose_threshold([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], "youden")
    assert math.isfinite(choice.threshold) and 0.0 <= choice.threshold <= 1.0
    assert choice.threshold == 1.0 and choice.tpr == 0.0 and choice.fpr == 0.0


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([1, 1, 1], [0.2, 0.5, 0.9], "single class"),
        ([0, 0], [0.2, 0.5], "single class"),
        ([0, 1, 1], [0.2, float("nan"), 0.9], "NaN"),
        ([0, 1, 1], [0.2, 0.5], "length mismatch"),
        ([], [], "no examples"),
        ([0, 1, 2], [0.2, 0.5, 0.9], "0/1"),
        ([0, 1], [0.2, 1.5], r"\[0, 1\]"),
        ([0, 1], [[0.8, 0.2], [0.3, 0.7]], "1-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(y: list, p: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_threshold(y, p, "max-f1")


def test_threshold_file_round_trips_through_the_settings_reader(tmp_path) -> None:
    choice = choose_threshold(Y, P, "fpr<=0.1")
    extra = {
        "model": {"base_model": "gemma3-270m", "lora_sha256": None, "lora_file": "a b/ĺora.npz"},
        "split": 'validation "v2"\n\\tab\there 😀 \x7f \x00',
        "n_sizes": [1, 2, 3],
        "weird key": 1e-5,
    }
    path = write_threshold_file(tmp_path / "nested" / "threshold.toml", choice, extra)
    data = read_threshold_file(path)
    assert data["threshold"] == choice.threshold  # exact, not approx
    assert data["policy"] == "fpr<=0.1"
    assert isinstance(data["chosen_at"], str) and data["chosen_at"].endswith("+00:00")
    validation = data["validation"]
    for key in ("tpr", "fpr", "precision", "recall", "f1", "n", "positives"):
        assert validation[key] == getattr(choice, key)
    assert "note" not in validation  # TOML has no null: None is left out
    assert data["model"] == {"base_model": "gemma3-270m", "lora_file": "a b/ĺora.npz"}
    assert data["split"] == extra["split"]
    assert data["n_sizes"] == [1, 2, 3]
    assert data["weird key"] == 1e-5
    assert not list(tmp_path.glob("nested/.threshold.toml.*"))  # no temp files left behind


def test_threshold_file_keeps_the_note(tmp_path) -> None:
    choice = choose_threshold([0, 1, 0, 0], [1.0, 1.0, 0.2, 0.3], "fpr<=0.1")
    data = read_threshold_file(write_threshold_file(tmp_path / "t.toml", choice))
    assert data["threshold"] == 1.0
    assert data["validation"]["note"] == choice.note


def test_threshold_file_rejects_clashing_or_unwritable_extra(tmp_path) -> None:
    choice = choose_threshold(Y, P, "youden")
    with pytest.raises(ValueError, match="clash"):
        write_threshold_file(tmp_path / "t.toml", choice, {"threshold": 0.1})
    with pytest.raises(TypeError, match="cannot write"):
        write_threshold_file(tmp_path / "t.toml", choice, {"when": object()})
    bad = ThresholdChoice(float("inf"), "youden", 0, 0, 0, 0, 0, 1, 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        write_threshold_file(tmp_path / "t.toml", bad)


def test_threshold_file_is_plain_toml(tmp_path) -> None:
    choice = choose_threshold(Y, P, "max-f1")
    text = write_threshold_file(tmp_path / "t.toml", choice, {"model": "m"}).read_text("utf-8")
    assert text.splitlines()[1] == "threshold = 0.9"
    assert "\n[validation]\n" in text
    assert tomllib.loads(text)["model"] == "m"


@pytest.mark.parametrize("seed", [0, 1])
def test_max_f1_and_youden_are_optimal_over_all_thresholds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1), 2)  # rounding makes ties

    def f1_at(t: float) -> float:
        tp = np.sum((p >= t) & (y == 1))
        return 2 * tp / (np.sum(p >= t) + np.sum(y == 1))

    def youden_at(t: float) -> float:
        return (p[y == 1] >= t).mean() - (p[y == 0] >= t).mean()

    candidates = [*np.unique(p), 1.0]
    assert f1_at(choose_threshold(y, p, "max-f1").threshold) == max(map(f1_at, candidates))
    assert youden_at(choose_threshold(y, p, "youden").threshold) == pytest.approx(
        max(map(youden_at, candidates))
    )
