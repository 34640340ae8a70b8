"""LoRA training on the tiny model: it learns, saves kilobytes, and reloads to the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from moderation_worker.model.classifier import AgileClassifier
from moderation_worker.model.lora import LoraAdapter, LoraMetadata, lora_paths, read_lora_metadata
from moderation_worker.model.prompts import PromptEncoder, PromptSettings
from moderation_worker.model.sources import build_tiny_model
from moderation_worker.model.training import (
    LabelledPromptBatches,
    TrainingConfig,
    calibrate_threshold,
    class_weights,
    train_classifier,
    train_lora,
)

KIND = ["you are lovely and kind", "thanks friend, great video", "nice song today"]
MEAN = ["i hate you awful stupid people", "everyone here is terrible", "go away angry idiots"]
TEXTS = (KIND + MEAN) * 4
LABELS = np.array(([0] * 3 + [1] * 3) * 4)


def fit_tiny(tmp_path, loss="labels", epochs=6, seed=7, model=None, rank=4):
    """Train an adapter on the tiny model (a fresh one unless given); returns it saved."""
    model = model or build_tiny_model(seed=0)
    encoder = PromptEncoder(model.tokenizer, PromptSettings())
    config = TrainingConfig(
        rank=rank, epochs=epochs, batch_size=4, learning_rate=1e-2, loss=loss, seed=seed
    )
    result = train_lora(model.backbone, encoder, TEXTS, LABELS, config, verbose=0)
    metadata = LoraMetadata(
        model.name, encoder.settings, config.rank, threshold=0.4, data_sha256="abc"
    )
    adapter = LoraAdapter.from_backbone(model.backbone, metadata).save(tmp_path / "tiny")
    return model, result, adapter


@pytest.mark.parametrize("loss, margin", [("labels", 0.2), ("vocab", 0.05)])
def test_training_lowers_the_loss_and_separates_classes(tmp_path, loss, margin) -> None:
    model, result, adapter = fit_tiny(tmp_path, loss=loss)
    losses = result.history["loss"]
    assert losses[-1] < losses[0] - 0.3
    assert result.trainable_parameters > 0 and result.steps == 6 * 6
    clf = AgileClassifier(model, adapter=adapter, batch_size=4)
    p = clf.p_positive(KIND + MEAN)
    # the vocab loss spreads its push over 600 tokens, so it separates the labels more slowly
    assert p[3:].mean() > p[:3].mean() + margin


def test_saved_lora_reloads_onto_a_fresh_base_with_identical_probabilities(tmp_path) -> None:
    model, _, adapter = fit_tiny(tmp_path, epochs=2)
    path = adapter.path
    trained = AgileClassifier(model, adapter=adapter, batch_size=4).predict_proba(TEXTS)
    weights, meta = lora_paths(path)
    assert weights.stat().st_size < 200_000 and meta.is_file()  # kilobytes, not a base model
    assert weights.stat().st_mode & 0o777 == 0o644

    reloaded = AgileClassifier(build_tiny_model(seed=0), lora_weights=path, batch_size=4)
    np.testing.assert_allclose(reloaded.predict_proba(TEXTS), trained, atol=1e-6)
    assert reloaded.threshold == 0.4  # calibrated threshold travels with the weights
    assert reloaded.identity.lora_sha256 and len(reloaded.identity.lora_sha256) == 64
    zero_shot = AgileClassifier(build_tiny_model(seed=0), batch_size=4).predict_proba(TEXTS)
    assert not np.allclose(zero_shot, trained, atol=1e-3)


def test_same_seed_same_weights(tmp_path) -> None:
    m1, _, a1 = fit_tiny(tmp_path / "a", epochs=1)
    m2, _, a2 = fit_tiny(tmp_path / "b", epochs=1)
    p1 = AgileClassifier(m1, adapter=a1, batch_size=4).predict_proba(TEXTS[:6])
    p2 = AgileClassifier(m2, adapter=a2, batch_size=4).predict_proba(TEXTS[:6])
    np.testing.assert_allclose(p1, p2, atol=1e-6)


def test_lora_for_another_base_model_is_refused(tmp_path) -> None:
    _, _, adapter = fit_tiny(tmp_path, epochs=1)
    other = build_tiny_model(seed=0)
    other.name = "some-other-model"
    with pytest.raises(ValueError, match="trained on"):
        AgileClassifier(other, lora_weights=adapter.path)
    with pytest.raises(ValueError, match="trained on"):
        AgileClassifier(other, adapter=adapter)


def test_missing_metadata_is_a_clear_error(tmp_path) -> None:
    _, _, adapter = fit_tiny(tmp_path, epochs=1)
    lora_paths(adapter.path)[1].unlink()
    with pytest.raises(FileNotFoundError, match="metadata"):
        read_lora_metadata(adapter.path)


def test_length_buckets_are_exact_for_the_label_position(tiny_model) -> None:
    """Padding to 48 instead of 128 tokens must not change the label-position logits."""
    from moderation_worker.model.scoring import LabelTokenModel

    encoder = PromptEncoder(tiny_model.tokenizer, PromptSettings())
    prompts = [encoder.encode_ids(t)[0] for t in TEXTS[:4]]
    bucketed = LabelledPromptBatches(prompts, np.zeros(4), np.ones(4), 4, 0, 128, 16, 0)
    inputs, _, _ = bucketed[0]
    assert inputs["token_ids"].shape[1] < 128
    model = LabelTokenModel(tiny_model.backbone, encoder.label_ids)
    short = np.asarray(model(inputs))
    order = bucketed.order[:4]
    full = np.asarray(model(encoder.encode([TEXTS[i] for i in order]).as_inputs()))
    np.testing.assert_allclose(short, full, atol=1e-5)


def test_class_weights_balance() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), balance=True)
    assert w[3] == pytest.approx(3 * w[0]) and w.mean() == pytest.approx(1.0)
    assert (class_weights(np.array([0, 1]), balance=False) == 1).all()


def test_bad_training_input(tiny_model) -> None:
    encoder = PromptEncoder(tiny_model.tokenizer, PromptSettings())
    with pytest.raises(ValueError, match="labels must be indices"):
        train_lora(tiny_model.backbone, encoder, ["a"], np.array([2]), verbose=0)
    with pytest.raises(ValueError, match="no training examples"):
        train_lora(tiny_model.backbone, encoder, [], np.array([], dtype=int), verbose=0)


def test_worker_falls_back_to_the_threshold_calibrated_into_the_lora_weights(tmp_path) -> None:
    from moderation_worker.settings import Settings
    from moderation_worker.threshold_source import ThresholdSource

    _, _, adapter = fit_tiny(tmp_path, epochs=1)
    path = adapter.path
    clf = AgileClassifier(build_tiny_model(seed=0), lora_weights=path, batch_size=4)
    assert clf.calibrated_threshold == 0.4 and clf.threshold == 0.4
    source = ThresholdSource(Settings(), clf)
    assert source() == 0.4 and source.in_force.source == "model"  # nothing in config
    assert ThresholdSource(Settings(threshold=0.7), clf)() == 0.7  # config wins
    assert (
        AgileClassifier(build_tiny_model(seed=0), lora_weights=path, threshold=0.2).threshold == 0.2
    )


def test_history_holds_epoch_means_not_the_last_batch(tiny_model, monkeypatch) -> None:
    from moderation_worker.model.scoring import LabelTokenModel

    seen: list[float] = []
    original = LabelTokenModel.train_on_batch

    def recording(self, *args, **kwargs):
        logs = original(self, *args, **kwargs)
        seen.append(float(logs["loss"]))
        return logs

    monkeypatch.setattr(LabelTokenModel, "train_on_batch", recording)
    encoder = PromptEncoder(tiny_model.tokenizer, PromptSettings())
    config = TrainingConfig(epochs=2, batch_size=4, learning_rate=1e-2, loss="labels")
    result = train_lora(tiny_model.backbone, encoder, TEXTS, LABELS, config, verbose=0)
    assert len(seen) == 12
    assert result.history["loss"] == pytest.approx([np.mean(seen[:6]), np.mean(seen[6:])])
    assert result.history["loss"][0] != pytest.approx(seen[5])  # not the last batch


def test_train_classifier_calibrates_on_validation_and_saves(tmp_path) -> None:
    """The `train` command's job without the CLI: fit, calibrate, record, save, reload."""
    base = build_tiny_model(seed=0)
    binary = np.array(([0] * 3 + [1] * 3) * 4)  # 1 = the positive label ("Toxic")
    config = TrainingConfig(epochs=2, batch_size=4, learning_rate=1e-2, loss="labels")
    trained = train_classifier(
        base,
        TEXTS,
        binary,
        KIND + MEAN,
        np.array([0, 0, 0, 1, 1, 1]),
        config=config,
        policy="youden",
        out=tmp_path / "m",
        data_sha256="feed",
        notes={"data": "inline"},
        verbose=0,
    )
    meta = read_lora_metadata(tmp_path / "m")
    assert trained.adapter.path == tmp_path / "m.lora.h5" and len(trained.adapter.sha256) == 64
    assert meta.threshold == trained.threshold.threshold and meta.threshold_policy == "youden"
    assert meta.training["train_rows"] == 24 and meta.training["data"] == "inline"
    assert meta.data_sha256 == "feed" and "f1" in meta.metrics["validation"]
    assert trained.summary()["lora_weights"] == str(tmp_path / "m.lora.h5")

    reloaded = AgileClassifier(build_tiny_model(seed=0), lora_weights=tmp_path / "m", batch_size=4)
    assert reloaded.calibrated_threshold == meta.threshold == reloaded.threshold
    choice = calibrate_threshold(reloaded, KIND + MEAN, np.array([0, 0, 0, 1, 1, 1]), "youden")
    assert choice.threshold == pytest.approx(meta.threshold, abs=1e-6)  # same scores, same pick


def test_train_classifier_without_two_validation_classes_keeps_one_half(tmp_path) -> None:
    config = TrainingConfig(epochs=1, batch_size=4, learning_rate=1e-2, loss="labels")
    binary = np.array(([0] * 3 + [1] * 3) * 4)
    trained = train_classifier(
        build_tiny_model(seed=0), TEXTS, binary, KIND, np.zeros(3), config=config, verbose=0
    )
    assert trained.threshold is None and trained.adapter.path is None
    assert trained.metadata.threshold == 0.5 and trained.metadata.threshold_policy is None
    with pytest.raises(ValueError, match="two labels"):
        train_classifier(
            build_tiny_model(seed=0),
            TEXTS,
            binary,
            prompt=PromptSettings(labels=("Safe", "Toxic", "yes"), positive_label="Toxic"),
            verbose=0,
        )
