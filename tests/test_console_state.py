"""The console's numbers without a broker: rates, curves, the operating point, the queue,
whether a control version has reached every partition."""

from __future__ import annotations

import random

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from moderation_worker.tools.console.state import ConsoleState


def verdict(i: int, p: float, partition: int = 0, version: int = 0, community=None) -> dict:
    return {
        "id": f"c{i}",
        "community": community,
        "control_version": version,
        "scored_at": "2026-12-02T00:00:00Z",
        "source": {"topic": "comments", "partition": partition, "offset": i},
        "classifiers": {
            "hate": {"p": p, "flagged": p >= 0.5, "threshold": 0.5,
                     "threshold_source": "setting", "mode": "enforce"},
        },
    }  # fmt: skip


@pytest.fixture
def state() -> ConsoleState:
    now = [1000.0]
    s = ConsoleState(window_s=60.0, clock=lambda: now[0])
    rng = np.random.default_rng(0)
    for i in range(200):
        p = float(rng.random())
        s.add_comment(f"c{i}", f"text {i}")
        s.add_verdict(verdict(i, p, partition=i % 2, community="gaming" if i % 4 == 0 else None))
        if i < 100:  # labels agree with p most of the time
            s.add_label("hate", f"c{i}", int(p + rng.normal(0, 0.2) > 0.5))
    return s


def test_recent_rows_are_newest_first_with_their_text(state: ConsoleState) -> None:
    rows = state.recent("hate", 3)
    assert [r["id"] for r in rows] == ["c199", "c198", "c197"]
    assert rows[0]["text"] == "text 199" and rows[0]["threshold_source"] == "setting"


def test_rates_per_classifier_and_community_over_the_window(state: ConsoleState) -> None:
    rates = state.rates()
    assert rates["per_classifier"]["hate"]["per_min"] == pytest.approx(200.0)
    flagged = sum(r["flagged"] for r in state.recent("hate", 500))
    assert rates["per_classifier"]["hate"]["flagged_per_min"] == pytest.approx(flagged)
    assert rates["per_community"] == {"gaming": 50.0, "(none)": 150.0}
    state.clock = lambda: 2000.0  # the window has passed: nothing recent
    assert state.rates()["per_classifier"] == {}


def test_the_curve_and_operating_point_come_from_labels_joined_with_scores(
    state: ConsoleState,
) -> None:
    y, p = state.points("hate")
    assert len(y) == 100
    curve = state.curve("hate")
    fpr, tpr = np.array(curve["roc"]["fpr"]), np.array(curve["roc"]["tpr"])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    op = state.operating_point("hate", 0.5)
    pred = p >= 0.5
    assert op["precision"] == pytest.approx((pred & (y == 1)).sum() / pred.sum())
    assert op["recall"] == pytest.approx((pred & (y == 1)).sum() / (y == 1).sum())
    assert op["fpr"] == pytest.approx((pred & (y == 0)).sum() / (y == 0).sum())
    window = np.array([r["p"] for r in state.recent("hate", 500)])
    assert op["flag_share"] == pytest.approx(np.mean(window >= 0.5))
    assert op["flags_per_hour"] == pytest.approx(np.mean(window >= 0.5) * 200 * 60)
    higher = state.operating_point("hate", 0.9)
    assert higher["flags_per_hour"] < op["flags_per_hour"] and higher["recall"] < op["recall"]
    state.add_calibration("hate", [(0.99, 1), (0.01, 0)])
    assert state.curve("hate")["labelled"] == 102


def test_without_both_classes_there_is_no_curve_but_still_a_flag_rate() -> None:
    s = ConsoleState()
    s.add_verdict(verdict(1, 0.7))
    s.add_label("hate", "c1", 1)
    assert s.curve("hate")["roc"] is None
    op = s.operating_point("hate", 0.5)
    assert op["precision"] == 1.0 and op["fpr"] is None and op["flag_share"] == 1.0


def test_the_queue_is_the_least_sure_unlabelled_plus_a_random_share(state: ConsoleState) -> None:
    items = state.queue("hate", 0.5, n=10, random_share=0.2, rng=random.Random(1))
    assert len(items) == 10 and [i["why"] for i in items].count("random") == 2
    ids = {i["id"] for i in items}
    assert not ids & {f"c{i}" for i in range(100)}  # labelled ones never come back
    uncertain = [i for i in items if i["why"] == "uncertain"]
    others = [
        r for r in state.recent("hate", 500) if r["id"] not in ids and int(r["id"][1:]) >= 100
    ]
    assert max(abs(i["p"] - 0.5) for i in uncertain) <= min(abs(r["p"] - 0.5) for r in others)


def test_applied_waits_for_every_partition_seen() -> None:
    s = ConsoleState()
    s.add_verdict(verdict(1, 0.2, partition=0, version=3))
    s.add_verdict(verdict(2, 0.2, partition=1, version=2))
    assert s.applied(3) == {"target": 3, "partitions": {"0": 3, "1": 2}, "applied": False,
                            "waiting": ["1"]}  # fmt: skip
    s.add_verdict(verdict(3, 0.2, partition=1, version=3))
    assert s.applied(3)["applied"] and not ConsoleState().applied(1)["applied"]
