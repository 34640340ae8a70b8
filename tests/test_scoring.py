"""The label-token head gives the same probabilities as the full CausalLM logits."""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
import pytest

from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.model.prompts import PromptEncoder, PromptSettings
from moderation_worker.model.scoring import LabelTokenScorer, softmax_np

TEXTS = [
    "you are lovely",
    "i hate all of you people, awful",
    "word " * 400,
    "🙂 مرحبا \u200b <separator>",
    "x",
]


def full_logits_probabilities(backbone, encoder: PromptEncoder, texts, causal_lm_cls) -> np.ndarray:
    """The codelab's way: full-vocabulary logits at every position, then the label columns."""
    lm = causal_lm_cls(backbone=backbone, preprocessor=None)
    batch = encoder.encode(texts)
    logits = np.asarray(lm({"token_ids": batch.token_ids, "padding_mask": batch.padding_mask}))
    assert logits.shape == (len(texts), 128, backbone.vocabulary_size)
    rows = logits[np.arange(len(texts)), batch.last_index][:, list(encoder.label_ids)]
    return softmax_np(rows)


def test_label_head_equals_full_causal_lm_logits(tiny_model) -> None:
    encoder = PromptEncoder(tiny_model.tokenizer, PromptSettings())
    scorer = LabelTokenScorer(tiny_model.backbone, encoder.label_ids)
    ours = scorer.probabilities(encoder.encode(TEXTS))
    reference = full_logits_probabilities(
        tiny_model.backbone, encoder, TEXTS, keras_hub.models.Gemma3CausalLM
    )
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert not np.allclose(ours[0], ours[1])  # not a constant


def test_label_head_equals_full_logits_with_soft_cap_gemma1() -> None:
    """Gemma (v1/v2 family, the preset path) with a final logit soft cap, same equality."""
    from moderation_worker.model.sources import build_tiny_model

    tokenizer = build_tiny_model().tokenizer
    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
        final_logit_soft_cap=5.0,
        attention_logit_soft_cap=None,
    )
    model = LoadedModel(backbone, tokenizer, "tiny-gemma")
    encoder = PromptEncoder(tokenizer, PromptSettings())
    ours = LabelTokenScorer(backbone, encoder.label_ids).probabilities(encoder.encode(TEXTS))
    reference = full_logits_probabilities(backbone, encoder, TEXTS, keras_hub.models.GemmaCausalLM)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert model.name == "tiny-gemma"


def test_padding_rows_do_not_change_real_rows(tiny_classifier: AgileClassifier) -> None:
    alone = tiny_classifier.predict_proba(TEXTS[:1])
    together = tiny_classifier.predict_proba(TEXTS)
    np.testing.assert_allclose(alone[0], together[0], atol=1e-5)


def test_probabilities_are_a_distribution(tiny_classifier: AgileClassifier) -> None:
    probs = tiny_classifier.predict_proba(TEXTS * 3)  # 15 rows -> 4 fixed-shape calls of 4
    assert probs.shape == (15, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs[:5], probs[5:10], atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_xla_and_eager_graphs_agree(tiny_model, jit) -> None:
    encoder = PromptEncoder(tiny_model.tokenizer, PromptSettings())
    batch = encoder.encode(TEXTS)
    base = LabelTokenScorer(tiny_model.backbone, encoder.label_ids, jit_compile=False)
    other = LabelTokenScorer(tiny_model.backbone, encoder.label_ids, jit_compile=jit)
    np.testing.assert_allclose(base.probabilities(batch), other.probabilities(batch), atol=1e-5)


def test_length_buckets_give_the_same_probabilities(tiny_model) -> None:
    fixed = AgileClassifier(tiny_model, batch_size=4)
    bucketed = AgileClassifier(tiny_model, batch_size=4, length_buckets=(48, 64))
    batch = bucketed.encoder.encode(TEXTS[:2], batch_size=4)
    needed = int(batch.last_index.max()) + 1
    cut = batch.cut_to(bucketed.length_buckets).token_ids.shape[1]
    assert cut == min(b for b in (48, 64, 128) if b >= needed) and cut < 128
    np.testing.assert_allclose(bucketed.predict_proba(TEXTS), fixed.predict_proba(TEXTS), atol=1e-5)
