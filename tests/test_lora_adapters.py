"""LoRA adapters are data applied to a shared backbone: classifiers on one base never interfere."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from moderation_worker.model.classifier import AgileClassifier
from moderation_worker.model.lora import LoraAdapter, file_sha256, lora_paths
from moderation_worker.model.lora_slot import adapter_slot
from moderation_worker.model.prompts import PromptEncoder, PromptSettings
from moderation_worker.model.sources import build_tiny_model
from moderation_worker.model.training import TrainingConfig, train_lora
from tests.test_training import LABELS, TEXTS, fit_tiny

PROBE = TEXTS[:6]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two different adapters for the tiny base (rank 4, and rank 2 on the vocab loss), saved."""
    _, _, first = fit_tiny(tmp_path_factory.mktemp("first"), loss="labels", epochs=3, seed=7)
    _, _, second = fit_tiny(
        tmp_path_factory.mktemp("second"), loss="vocab", epochs=3, seed=11, rank=2
    )
    return first.path, second.path


@pytest.fixture(scope="module")
def alone(adapters):
    """Each classifier's probabilities when it is the only one on a fresh base."""
    first, second = adapters
    return {
        name: AgileClassifier(build_tiny_model(seed=0), lora_weights=path, batch_size=4)
        .predict_proba(PROBE)
        .copy()
        for name, path in (("first", first), ("second", second), ("zero", None))
    }


def test_adapters_and_zero_shot_on_one_base_each_score_as_if_alone(adapters, alone) -> None:
    """The bug this guards against: the second classifier's weights went into the shared
    backbone and silently changed the first classifier's scores."""
    for a, b in (("first", "second"), ("first", "zero"), ("second", "zero")):
        assert np.abs(alone[a] - alone[b]).max() > 1e-3  # the test can tell them apart

    base = build_tiny_model(seed=0)
    early_zero = AgileClassifier(base, batch_size=4)  # built and compiled before LoRA exists
    np.testing.assert_allclose(early_zero.predict_proba(PROBE), alone["zero"], atol=1e-6)
    first = AgileClassifier(base, lora_weights=adapters[0], batch_size=4)
    second = AgileClassifier(base, lora_weights=adapters[1], batch_size=4)  # rank 2, padded
    late_zero = AgileClassifier(base, batch_size=4)  # built on a LoRA-enabled backbone

    order = [first, second, early_zero, late_zero, second, first, first, late_zero, second]
    expected = {id(first): "first", id(second): "second"}
    for clf in order:
        want = alone[expected.get(id(clf), "zero")]
        np.testing.assert_allclose(clf.predict_proba(PROBE), want, atol=1e-6)
    assert first.identity.lora_sha256 == file_sha256(adapters[0])
    assert second.identity.lora_sha256 == file_sha256(adapters[1])
    assert early_zero.identity.lora_sha256 is None


def test_applying_is_idempotent_cheap_and_never_reads_the_disk(adapters, monkeypatch) -> None:
    base = build_tiny_model(seed=0)
    first = AgileClassifier(base, lora_weights=adapters[0], batch_size=4)
    second = AgileClassifier(base, lora_weights=adapters[1], batch_size=4)
    zero = AgileClassifier(base, batch_size=4)
    slot = adapter_slot(base.backbone)
    assert first.slot is second.slot is zero.slot is slot and slot.rank == 4

    def no_disk(*args, **kwargs):
        raise AssertionError("an adapter was read from disk while scoring")

    monkeypatch.setattr(h5py, "File", no_disk)
    monkeypatch.setattr(LoraAdapter, "load", no_disk)
    first.predict_proba(PROBE)
    assert slot.active is first.adapter
    writes = slot.writes
    first.predict_proba(PROBE + PROBE)  # 3 batches, same adapter: nothing written
    assert slot.writes == writes
    second.predict_proba(PROBE)  # the swap is visible
    assert slot.active is second.adapter and slot.writes == writes + 1
    zero.predict_proba(PROBE)
    assert slot.active is None and slot.writes == writes + 2
    assert slot.apply(first.adapter) is True and slot.apply(first.adapter) is False
    assert slot.active is first.adapter and slot.writes == writes + 3


def test_adapter_round_trips_through_save_and_load(adapters, tmp_path) -> None:
    loaded = LoraAdapter.load(adapters[0])
    assert loaded.sha256 == file_sha256(adapters[0]) and loaded.path == adapters[0]
    saved = loaded.save(tmp_path / "copy")
    assert saved.path == tmp_path / "copy.lora.h5" and saved.sha256 == file_sha256(saved.path)
    again = LoraAdapter.load(tmp_path / "copy.lora.json", base_model=loaded.metadata.base_model)
    assert again.metadata.to_dict() == loaded.metadata.to_dict()
    assert again.factors.keys() == loaded.factors.keys() and again.rank == 4
    for index, (a, b) in loaded.factors.items():
        np.testing.assert_array_equal(again.factors[index][0], a)
        np.testing.assert_array_equal(again.factors[index][1], b)
        assert not a.flags.writeable  # shared data: nobody edits it in place
    with pytest.raises(ValueError, match="trained on"):
        LoraAdapter.load(adapters[0], base_model="another-model")


def test_files_stay_kerashub_lora_h5(adapters, alone, tmp_path) -> None:
    """KerasHub's own loader reads what we write, and we read what KerasHub writes."""
    from moderation_worker.model.scoring import LabelTokenScorer

    copy = LoraAdapter.load(adapters[0]).save(tmp_path / "ours")
    base = build_tiny_model(seed=0)
    base.backbone.load_lora_weights(str(copy.path))  # KerasHub's loader, not ours
    encoder = PromptEncoder(base.tokenizer, PromptSettings())
    scorer = LabelTokenScorer(base.backbone, encoder.label_ids)
    probs = scorer.probabilities(encoder.encode(PROBE, batch_size=len(PROBE)))
    np.testing.assert_allclose(probs, alone["first"], atol=1e-6)

    theirs, _ = lora_paths(tmp_path / "theirs")
    base.backbone.save_lora_weights(str(theirs))  # KerasHub's writer
    lora_paths(copy.path)[1].replace(lora_paths(theirs)[1])
    read_back = LoraAdapter.load(theirs)
    for index, (a, b) in copy.factors.items():
        np.testing.assert_array_equal(read_back.factors[index][0], a)
        np.testing.assert_array_equal(read_back.factors[index][1], b)


def test_training_on_a_shared_base_leaves_its_classifiers_unchanged(adapters, alone) -> None:
    base = build_tiny_model(seed=0)
    first = AgileClassifier(base, lora_weights=adapters[0], batch_size=4)
    zero = AgileClassifier(base, batch_size=4)
    first.predict_proba(PROBE)
    encoder = PromptEncoder(base.tokenizer, PromptSettings())
    config = TrainingConfig(epochs=1, batch_size=4, learning_rate=1e-2, loss="labels")
    train_lora(base.backbone, encoder, TEXTS, LABELS, config, verbose=0)  # reuses the slot
    np.testing.assert_allclose(first.predict_proba(PROBE), alone["first"], atol=1e-6)
    np.testing.assert_allclose(zero.predict_proba(PROBE), alone["zero"], atol=1e-6)


def test_misfits_are_refused(adapters) -> None:
    base = build_tiny_model(seed=0)
    AgileClassifier(base, lora_weights=adapters[1])  # LoRA enabled with rank 2
    with pytest.raises(ValueError, match="does not fit"):
        AgileClassifier(base, lora_weights=adapters[0])  # rank 4 cannot go into rank 2
    with pytest.raises(ValueError, match="not both"):
        AgileClassifier(base, lora_weights=adapters[1], adapter=LoraAdapter.load(adapters[1]))
    config = TrainingConfig(rank=4, epochs=1)
    encoder = PromptEncoder(base.tokenizer, PromptSettings())
    with pytest.raises(ValueError, match="cannot train rank 4"):
        train_lora(base.backbone, encoder, TEXTS[:2], LABELS[:2], config, verbose=0)
