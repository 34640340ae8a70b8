"""Per-row LoRA: rows of different classifiers in one call score as each classifier alone."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from moderation_worker.model.classifier import AgileClassifier
from moderation_worker.model.classifier_set import ClassifierSet
from moderation_worker.model.lora import LoraAdapter, LoraMetadata
from moderation_worker.model.lora_slot import adapter_slot
from moderation_worker.model.multi_lora import _delta_equations
from moderation_worker.model.prompts import PromptSettings
from moderation_worker.model.sources import build_tiny_model

TEXTS = ["you are lovely", "you are awful people", "hello there", "the match was great", "idiot"]
TARGETS = ("query", "value")


def random_adapter(model, seed: int, rank: int = 4, labels=("Safe", "Toxic"), scale=0.3):
    """An adapter with random factors for the tiny base: far from the identity on purpose."""
    rng = np.random.default_rng(seed)
    layers = {
        i: layer
        for i, layer in enumerate(
            lyr for lyr in model.backbone._flatten_layers(include_self=False) if lyr.weights
        )
        if layer.name in TARGETS
    }
    factors = {
        i: (
            rng.normal(0, scale, (*layer._kernel.shape[:-1], rank)).astype("float32"),
            rng.normal(0, scale, (rank, layer._kernel.shape[-1])).astype("float32"),
        )
        for i, layer in layers.items()
    }
    prompt = PromptSettings(labels=labels, positive_label=labels[1])
    meta = LoraMetadata(base_model=model.name, prompt=prompt, rank=rank, target_layers=TARGETS)
    return LoraAdapter(factors, meta)


@pytest.fixture(scope="module")
def setup():
    model = build_tiny_model(seed=0)
    adapters = {
        "a": random_adapter(model, 1),
        "b": random_adapter(model, 2, rank=2, labels=("No", "Yes")),
    }
    alone = {
        name: AgileClassifier(model, adapter=adapter, batch_size=4).p_positive(TEXTS)
        for name, adapter in adapters.items()
    }
    alone["zero"] = AgileClassifier(model, batch_size=4).p_positive(TEXTS)
    return model, adapters, alone


def test_delta_equations_put_the_batch_letter_on_the_factors() -> None:
    assert _delta_equations("btd,dnh->btnh") == ("btd,bdnz->btnz", "btnz,bzh->btnh")
    assert _delta_equations("btnh,nhd->btd") == ("btnh,bnhz->btz", "btz,bzd->btd")
    with pytest.raises(ValueError, match="cannot factor"):
        _delta_equations("bd,hd->bh")  # the kernel's last axis is contracted, not an output
    with pytest.raises(ValueError, match="ellipsis"):
        _delta_equations("...d,dh->...h")


def test_mixed_rows_in_one_call_equal_each_classifier_alone(setup) -> None:
    model, adapters, alone = setup
    rules = ClassifierSet(model, {**adapters, "zero": None}, batch_size=4)
    names = ["a"] * 5 + ["b"] * 5 + ["zero"] * 5
    texts = TEXTS * 3
    order = np.random.default_rng(0).permutation(len(texts))  # every call a different mix
    p = rules.p_positive([texts[i] for i in order], [names[i] for i in order])
    for row, i in enumerate(order):
        assert p[row] == pytest.approx(alone[names[i]][i % 5], abs=1e-5)
    assert len({alone["a"][0], alone["b"][0], alone["zero"][0]}) == 3  # adapters differ


def test_single_classifiers_on_the_same_backbone_are_unaffected(setup) -> None:
    model, adapters, alone = setup
    ClassifierSet(model, adapters, batch_size=4).p_positive(TEXTS, ["a"] * 5)
    after = AgileClassifier(model, adapter=adapters["a"], batch_size=4).p_positive(TEXTS)
    np.testing.assert_allclose(after, alone["a"], atol=1e-6)


def test_adding_a_classifier_while_serving_uses_a_spare_slot_then_refuses(setup) -> None:
    model, adapters, alone = setup
    fresh = build_tiny_model(seed=0)  # a backbone whose layers serve no other stack
    rules = ClassifierSet(fresh, {"a": random_adapter(fresh, 1)}, batch_size=4, spare_slots=1)
    rules.add("b", random_adapter(fresh, 2, rank=2, labels=("No", "Yes")))
    np.testing.assert_allclose(rules.p_positive(TEXTS, ["b"] * 5), alone["b"], atol=1e-5)
    with pytest.raises(ValueError, match="no free adapter slot"):
        rules.add("c", random_adapter(fresh, 3))
    rules.add("b", random_adapter(fresh, 1))  # replacing reuses the slot
    np.testing.assert_allclose(rules.p_positive(TEXTS, ["b"] * 5), alone["a"], atol=1e-5)


def test_misuse_is_refused_with_a_clear_message(setup) -> None:
    model, adapters, _ = setup
    other = build_tiny_model(seed=0)
    rules = ClassifierSet(other, {"a": random_adapter(other, 1)}, batch_size=4)
    with pytest.raises(KeyError, match="no classifier named 'nope'"):
        rules.predict_rows(["x"], ["nope"])
    with pytest.raises(ValueError, match="batch size 4"):
        rules.predict_rows(TEXTS, ["a"] * 5)
    with pytest.raises(ValueError, match="exceeds the stack's 4"):
        rules.add("big", random_adapter(other, 1, rank=8))


def test_sets_of_different_sizes_share_one_backbone(setup) -> None:
    model, adapters, alone = setup
    one = ClassifierSet(model, {"a": adapters["a"]}, batch_size=4)
    two = ClassifierSet(model, adapters, batch_size=4)
    np.testing.assert_allclose(one.p_positive(TEXTS, ["a"] * 5), alone["a"], atol=1e-5)
    np.testing.assert_allclose(two.p_positive(TEXTS, ["b"] * 5), alone["b"], atol=1e-5)
    np.testing.assert_allclose(one.p_positive(TEXTS, ["a"] * 5), alone["a"], atol=1e-5)


@pytest.mark.gemma270m
def test_per_row_lora_equals_single_adapter_classifiers_on_gemma3_270m() -> None:
    """The issue's bar: within 1e-4 of each `AgileClassifier` alone, on the real model."""
    from moderation_worker.model.sources import load_model_source, shipped_lora

    paths = {name: shipped_lora("gemma3-270m", name) for name in ("hate", "violence")}
    if any(p is None for p in paths.values()):
        pytest.skip("shipped adapters missing in this checkout")
    base = load_model_source("gemma3-270m")
    texts = [
        "Thank you so much for helping my grandmother cross the street.",
        "All immigrants are vermin and should be driven out by force.",
        "I will find you and break your legs, you clown.",
        "Women are too emotional to lead anything.",
    ]
    adapters = {n: LoraAdapter.load(p, base_model=base.name) for n, p in paths.items()}
    alone = {
        n: AgileClassifier(base, adapter=a, batch_size=4).p_positive(texts)
        for n, a in adapters.items()
    }
    adapter_slot(base.backbone).apply(None)
    rules = ClassifierSet(base, adapters, batch_size=4)
    names = ["hate", "violence", "violence", "hate", "violence", "hate", "hate", "violence"]
    p = rules.p_positive(texts + texts, names)
    expected = [alone[n][i % 4] for i, n in enumerate(names)]
    np.testing.assert_allclose(p, expected, atol=1e-4)


def test_an_adapter_override_swaps_weights_at_a_batch_boundary_and_a_bad_one_is_refused(
    setup, tmp_path
) -> None:
    """`adapter/<classifier>` control records: new weights without a restart, checked by sha256."""
    from moderation_worker.batching import admit
    from moderation_worker.control_records import record_for_adapter
    from moderation_worker.events import SourcePosition
    from moderation_worker.policy import ControlState, single_classifier_policy
    from moderation_worker.processor import BatchProcessor

    model, adapters, alone = setup
    fresh = build_tiny_model(seed=0)
    new = random_adapter(fresh, 2, rank=2, labels=("No", "Yes")).save(tmp_path / "v2.lora.h5")
    rules = ClassifierSet(fresh, {"hate": random_adapter(fresh, 1)}, batch_size=4)
    control = ControlState(single_classifier_policy("hate"))
    processor = BatchProcessor(rules, policy=control.snapshot)

    def score() -> list[dict]:
        events = [
            admit(
                orjson.dumps({"id": f"c{i}", "text": t}),
                key=None,
                source=SourcePosition("t", 0, i),
                handle=i,
                received_at=0.0,
            )
            for i, t in enumerate(TEXTS)
        ]
        outcomes = processor.process(events).outcomes
        return [o.verdict.to_dict()["classifiers"]["hate"] for o in outcomes]

    before = score()
    assert [r["p"] for r in before] == pytest.approx(list(alone["a"]), abs=1e-5)
    control.apply(*record_for_adapter("hate", str(new.path), new.sha256), offset=0)
    after = score()
    assert [r["p"] for r in after] == pytest.approx(list(alone["b"]), abs=1e-5)
    assert {r["lora_sha256"] for r in after} == {new.sha256}

    wrong = "0" * 64  # a record naming another file's hash: refused, the weights stay
    control.apply(*record_for_adapter("hate", str(new.path), wrong), offset=1)
    assert [r["p"] for r in score()] == pytest.approx(list(alone["b"]), abs=1e-5)
    control.apply(b"adapter/hate", None, offset=2)  # tombstone: the configured weights again
    assert [r["p"] for r in score()] == pytest.approx(list(alone["a"]), abs=1e-5)
