"""The classifier on the real Gemma 3 270M from PyPI: zero-shot and with the shipped LoRA."""

from __future__ import annotations

import numpy as np
import pytest

from moderation_worker.model.classifier import AgileClassifier
from moderation_worker.model.sources import load_model_source, shipped_lora

pytestmark = pytest.mark.gemma270m

KIND = "Thank you so much for helping my grandmother cross the street, that was very kind."
HATEFUL = "All immigrants are vermin and should be driven out of this country by force."


@pytest.fixture(scope="module")
def base():
    return load_model_source("gemma3-270m")


def test_zero_shot_probabilities_are_finite_and_depend_on_the_comment(base) -> None:
    clf = AgileClassifier(base, batch_size=2)
    probs = clf.predict_proba([KIND, HATEFUL])
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert abs(probs[0, 1] - probs[1, 1]) > 1e-3
    assert clf.identity.base_model == "gemma3-270m-q4_k_m" and clf.identity.lora_sha256 is None


def test_shipped_lora_weights_load_and_separate_a_clear_pair(base) -> None:
    path = shipped_lora("gemma3-270m")
    if path is None:
        pytest.skip("no shipped LoRA weights in this checkout")
    clf = AgileClassifier(base, lora_weights=path, batch_size=2)
    p_kind, p_hateful = clf.p_positive([KIND, HATEFUL])
    assert p_hateful > p_kind
    assert clf.lora is not None and clf.lora.rank == 4 and 0.0 < clf.threshold < 1.0
    assert len(clf.identity.lora_sha256 or "") == 64


def test_shipped_adapter_equals_kerashub_loader_and_leaves_zero_shot_alone(base) -> None:
    """The shipped file, applied as an adapter, gives what KerasHub's own loader gives, and a
    zero-shot classifier on the same base keeps its scores."""
    from moderation_worker.model.lora_slot import adapter_slot
    from moderation_worker.model.scoring import LabelTokenScorer

    path = shipped_lora("gemma3-270m")
    if path is None:
        pytest.skip("no shipped LoRA weights in this checkout")
    zero = AgileClassifier(base, batch_size=2)
    tuned = AgileClassifier(base, lora_weights=path, batch_size=2)
    p_zero, p_tuned = zero.predict_proba([KIND, HATEFUL]), tuned.predict_proba([KIND, HATEFUL])
    assert np.abs(p_tuned - p_zero).max() > 1e-3

    base.backbone.load_lora_weights(str(path))  # KerasHub writes the factors itself
    adapter_slot(base.backbone).mark_modified()
    scorer = LabelTokenScorer(base.backbone, tuned.encoder.label_ids, jit_compile=True)
    kerashub = scorer.probabilities(tuned.encoder.encode([KIND, HATEFUL], batch_size=2))
    np.testing.assert_allclose(p_tuned, kerashub, atol=1e-6)
    np.testing.assert_allclose(zero.predict_proba([KIND, HATEFUL]), p_zero, atol=1e-6)
    np.testing.assert_allclose(tuned.predict_proba([KIND, HATEFUL]), p_tuned, atol=1e-6)


def test_the_prefix_cache_scores_the_real_model_exactly(base) -> None:
    """The shared head's keys/values computed once equal the full forward pass on 270M,
    with the shipped adapter and across length buckets."""
    texts = [
        "you are lovely",
        "people like you should be driven out of this country " * 3,
        "the match was great, what a goal in the last minute",
        "idiots",
    ]
    kw = dict(lora_weights=shipped_lora("gemma3-270m"), batch_size=4, length_buckets=(32, 64, 96))
    cached = AgileClassifier(base, prefix_cache=True, **kw)
    full = AgileClassifier(base, prefix_cache=False, **kw)
    assert cached.scorer.prefix is not None and full.scorer.prefix is None
    assert cached.scorer.prefix.length == len(cached.encoder.head_ids)
    np.testing.assert_allclose(cached.predict_proba(texts), full.predict_proba(texts), atol=1e-4)
