"""The shared-prefix KV cache in the scoring path: exact, per adapter, rebuilt on change."""

from __future__ import annotations

import keras_hub
import numpy as np
import pytest

from moderation_worker.model.classifier import AgileClassifier
from moderation_worker.model.classifier_set import ClassifierSet
from moderation_worker.model.prefix_cache import PrefixCache, common_prefix, supports
from moderation_worker.model.scoring import LabelTokenScorer
from moderation_worker.model.sources import build_tiny_model
from tests.test_multi_lora import random_adapter

TEXTS = [
    "you are lovely",
    "you are awful people " * 6,
    "hello",
    "the match was great and the crowd sang all the way home " * 4,
    "idiot",
    "fine",
]
BUCKETS = (32, 64, 96)


def test_common_prefix_is_the_shared_start_of_every_head() -> None:
    assert common_prefix([[2, 5, 6, 7], [2, 5, 9], [2, 5, 6]]) == [2, 5]
    assert common_prefix([[2, 5, 6]]) == [2, 5, 6]
    assert common_prefix([[1, 2], [3, 4]]) == []


@pytest.mark.parametrize("with_adapter", [False, True])
def test_a_classifier_scores_the_same_with_and_without_the_prefix_cache(with_adapter) -> None:
    model = build_tiny_model(seed=0)
    adapter = random_adapter(model, 1) if with_adapter else None
    kw = dict(adapter=adapter, batch_size=4, length_buckets=BUCKETS)
    cached = AgileClassifier(model, prefix_cache=True, **kw)
    full = AgileClassifier(model, prefix_cache=False, **kw)
    assert cached.scorer.prefix is not None and full.scorer.prefix is None
    assert cached.scorer.prefix.prefix_ids == cached.encoder.head_ids
    assert len({cached.length_bucket(t) for t in TEXTS}) >= 2  # several shapes exercised
    np.testing.assert_allclose(cached.predict_proba(TEXTS), full.predict_proba(TEXTS), atol=1e-5)


def test_classifiers_sharing_a_backbone_each_keep_their_own_prefix() -> None:
    """Two adapters swap in the backbone's LoRA slot; each cache was built under its own."""
    model = build_tiny_model(seed=0)
    a = AgileClassifier(model, adapter=random_adapter(model, 1), batch_size=4)
    b = AgileClassifier(model, adapter=random_adapter(model, 2), batch_size=4)
    ref_a = AgileClassifier(model, adapter=a.adapter, batch_size=4, prefix_cache=False)
    ref_b = AgileClassifier(model, adapter=b.adapter, batch_size=4, prefix_cache=False)
    pa, pb = a.p_positive(TEXTS), b.p_positive(TEXTS)
    assert np.max(np.abs(pa - pb)) > 1e-3  # the adapters differ, so a stale cache would show
    np.testing.assert_allclose(pa, ref_a.p_positive(TEXTS), atol=1e-5)
    np.testing.assert_allclose(pb, ref_b.p_positive(TEXTS), atol=1e-5)
    np.testing.assert_allclose(a.p_positive(TEXTS), pa, atol=1e-6)  # after b wrote its factors


def test_a_classifier_set_caches_per_slot_and_rebuilds_when_an_adapter_changes() -> None:
    model = build_tiny_model(seed=0)
    adapters = {
        "zero": None,
        "a": random_adapter(model, 1),
        "b": random_adapter(model, 2, rank=2, labels=("No", "Yes")),  # another head
    }
    cached = ClassifierSet(model, adapters, batch_size=4, length_buckets=BUCKETS)
    full = ClassifierSet(model, adapters, batch_size=4, length_buckets=BUCKETS, prefix_cache=False)
    names = ["zero", "a", "b"] * 2
    assert cached._prefix is not None and full._prefix is None
    heads = [m.encoder.head_ids for m in cached.members.values()]
    assert cached._prefix.prefix_ids == common_prefix(heads)
    assert 1 <= cached._prefix.length < min(len(h) for h in heads)  # labels differ
    np.testing.assert_allclose(
        cached.p_positive(TEXTS, names), full.p_positive(TEXTS, names), atol=1e-5
    )
    swapped = random_adapter(model, 3)
    cached.add("a", swapped)  # a new adapter in slot a: its keys/values are recomputed
    full.add("a", swapped)
    np.testing.assert_allclose(
        cached.p_positive(TEXTS, names), full.p_positive(TEXTS, names), atol=1e-5
    )


def test_a_set_whose_members_share_the_whole_head_caches_all_of_it() -> None:
    model = build_tiny_model(seed=0)
    rules = ClassifierSet(
        model, {"a": random_adapter(model, 1), "c": random_adapter(model, 4)}, batch_size=4
    )
    assert rules._prefix is not None
    assert rules._prefix.prefix_ids == rules.members["a"].encoder.head_ids


def test_backbones_without_a_key_value_pair_cache_fall_back_to_the_full_pass() -> None:
    gemma1 = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    assert not supports(gemma1) and supports(build_tiny_model(seed=0).backbone)
    assert LabelTokenScorer(gemma1, [3, 4], prefix_ids=[2, 5]).prefix is None
    with pytest.raises(ValueError, match="no prefix cache"):
        PrefixCache(gemma1, [2, 5])
