"""Fixtures for models: the tiny random-weight Gemma 3 and its on-the-fly SentencePiece vocabulary.

Each test gets a fresh backbone: training writes LoRA factors into it (adapters themselves are
data, applied per classifier through `model.lora_slot`); the tokenizer is trained once per
session.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from moderation_worker.model.classifier import AgileClassifier, LoadedModel  # noqa: E402
from moderation_worker.model.sources import build_tiny_model  # noqa: E402


@pytest.fixture
def tiny_model() -> LoadedModel:
    """A fresh 2-layer, hidden-64 Gemma 3 with random weights (seed 0)."""
    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_classifier() -> AgileClassifier:
    """A zero-shot classifier on the tiny model, shared (read-only) across tests."""
    return AgileClassifier(build_tiny_model(seed=0), batch_size=4)
