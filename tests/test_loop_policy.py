"""The worker's side of the agile loop: candidate records, candidate rows, a promoted adapter's
threshold, and the training options the learner uses (start from production, time budget)."""

from __future__ import annotations

import numpy as np
import pytest

from moderation_worker.control_records import (
    ControlRecordError,
    record_for_adapter,
    record_for_candidate,
    record_for_threshold,
    tombstone,
)
from moderation_worker.model.classifier_set import ClassifierSet
from moderation_worker.model.sources import build_tiny_model
from moderation_worker.model.training import TrainingConfig, train_classifier
from moderation_worker.policy import ControlState, candidate_name
from tests.test_policy import applied, make_state

SHA = "ab" * 32


def test_a_candidate_is_a_shadow_row_of_the_events_routed_to_its_classifier() -> None:
    state = ControlState(make_state())
    after = applied(state, record_for_candidate("hate", "/m/c.lora.h5", SHA, 0.42, by="learner"))
    assert after.control_candidates["hate"] == {"lora": "/m/c.lora.h5", "sha256": SHA,
                                                "threshold": 0.42}  # fmt: skip
    name = candidate_name("hate")
    # a row only once the model has loaded it (never a row it cannot score)
    assert after.scored({"community": "gaming"}) == ["hate", "violence"]
    assert after.scored({"community": "gaming"}, loaded=("hate", name)) == [
        "hate",
        "violence",
        name,
    ]
    assert after.scored({}, loaded=(name,)) == ["hate", name]
    assert after.mode(name) == "shadow"
    assert after.threshold(name).value == 0.42 and after.threshold(name).detail == "candidate/hate"
    assert after.to_dict()["classifiers"]["hate"]["candidate"]["sha256"] == SHA
    gone = applied(state, tombstone("candidate/hate"), start=1)
    assert gone.control_candidates == {} and gone.scored({}, loaded=(name,)) == ["hate"]


@pytest.mark.parametrize(
    "value",
    [
        b'{"lora": "/m/c.lora.h5", "threshold": 0.4}',  # no sha256
        b'{"lora": "/m/c.lora.h5", "sha256": "' + SHA.encode() + b'"}',  # no threshold
        b'{"lora": "/m/c", "sha256": "' + SHA.encode() + b'", "threshold": 1.5}',
        b'{"lora": "/m/c", "sha256": "XYZ", "threshold": 0.5}',
    ],
)
def test_a_candidate_needs_its_checksum_and_its_threshold(value: bytes) -> None:
    state = ControlState(make_state())
    with pytest.raises(ControlRecordError):
        state.apply(b"candidate/hate", value, 0)
    with pytest.raises(ControlRecordError, match="no classifier"):
        state.apply(*record_for_candidate("nope", "/m/c", SHA, 0.5), 0)
    assert state.snapshot().control_candidates == {}


def test_a_promoted_adapter_brings_its_threshold_below_explicit_threshold_records() -> None:
    state = ControlState(make_state())
    promoted = applied(state, record_for_adapter("hate", "/m/v2.lora.h5", SHA, threshold=0.33))
    assert promoted.threshold("hate").value == 0.33
    assert promoted.threshold("hate").detail == "adapter/hate"
    assert promoted.threshold("hate", "gaming").value == 0.33  # control beats the config's 0.7
    explicit = applied(state, record_for_threshold("hate", 0.8), start=1)
    assert explicit.threshold("hate").value == 0.8


def _rows(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(np.int64)
    words = [["lovely", "kind"], ["awful", "vermin"]]
    return [f"you are {rng.choice(words[v])} today" for v in y], y


def test_training_from_an_adapter_starts_from_its_factors_and_a_budget_stops_it() -> None:
    base = build_tiny_model()
    texts, y = _rows(24, 0)
    first = train_classifier(base, texts, y, config=TrainingConfig(epochs=1), verbose=0)
    # zero epochs' worth of budget: the fit stops after its first step, from `init`'s factors
    again = train_classifier(
        base, texts, y, config=TrainingConfig(epochs=3), verbose=0, init=first.adapter,
        time_budget_s=0.0,
    )  # fmt: skip
    assert again.training.steps == 1 and again.metadata.training["stopped_early"]
    assert again.metadata.training["init_sha256"] == first.adapter.sha256
    a0, _ = first.adapter.factors[min(first.adapter.factors)]
    a1, _ = again.adapter.factors[min(again.adapter.factors)]
    fresh = train_classifier(base, texts, y, config=TrainingConfig(epochs=3), verbose=0,
                             time_budget_s=0.0)  # fmt: skip
    f1, _ = fresh.adapter.factors[min(fresh.adapter.factors)]
    # one step from `first` stays near it; a fresh start is elsewhere
    assert np.abs(a1 - a0).max() < np.abs(f1 - a0).max()
    with pytest.raises(ValueError, match="rank"):
        train_classifier(base, texts, y, config=TrainingConfig(rank=2, epochs=1), verbose=0,
                         init=first.adapter)  # fmt: skip


def test_a_zero_shot_set_loads_a_candidate_scores_it_and_drops_it(tmp_path) -> None:
    base = build_tiny_model()
    texts, y = _rows(24, 1)
    trained = train_classifier(base, texts, y, config=TrainingConfig(epochs=1), verbose=0)
    saved = trained.adapter.save(tmp_path / "candidate")
    rules = ClassifierSet(base, {"hate": None}, batch_size=4, jit_compile=False)
    name = candidate_name("hate")
    bad = rules.apply_candidates({"hate": {"lora": str(saved.path), "sha256": "0" * 64}})
    assert name not in rules.names and "not loaded" in bad[0]
    ok = rules.apply_candidates({"hate": {"lora": str(saved.path), "sha256": saved.sha256}})
    assert name in rules.names and "shadow" in ok[0]
    p = rules.predict_rows(["you are awful", "you are awful"], ["hate", name])[:, 1]
    assert p[0] != pytest.approx(p[1])  # its own adapter, not production's
    assert rules.identity_of(name).lora_sha256 == saved.sha256
    assert rules.apply_candidates({}) == [f"{name}: candidate withdrawn"]
    assert rules.names == ("hate",)
    with pytest.raises(ValueError, match="configured"):
        rules.remove("hate")
