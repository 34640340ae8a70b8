"""The TF-IDF baseline learns an obviously separable toy corpus and survives a save/load."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from moderation_worker.tools.baseline import TfidfBaseline

HATEFUL = ["vermin", "scum", "subhuman", "filth", "parasites", "disgusting", "hate", "exterminate"]
NEUTRAL = ["lovely", "recipe", "weather", "football", "garden", "concert", "thanks", "holiday"]
FILLER = ["the", "they", "are", "this", "really", "people", "again", "today", "all", "so"]


def _corpus(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Random sentences; hateful ones draw two cue words from HATEFUL, others from NEUTRAL."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    texts = []
    for label in y:
        cues = rng.choice(HATEFUL if label else NEUTRAL, size=2, replace=False).tolist()
        words = rng.choice(FILLER, size=5).tolist() + cues
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts, y


@pytest.fixture(scope="module")
def fitted() -> TfidfBaseline:
    texts, y = _corpus(200, seed=0)
    # awkward inputs in training must not break fitting
    texts += ["", "🙂🔥", "SCUM!!! 😡"]
    y = np.concatenate([y, [0, 0, 1]])
    return TfidfBaseline().fit(texts, y)


def test_learns_separable_toy_corpus(fitted: TfidfBaseline) -> None:
    texts, y = _corpus(100, seed=1)
    proba = fitted.predict_proba(texts)
    assert proba.shape == (100, 2)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert roc_auc_score(y, proba[:, 1]) > 0.9


def test_tolerates_empty_and_emoji_texts(fitted: TfidfBaseline) -> None:
    proba = fitted.predict_proba(["", "😡😡😡", "\u200b", "h4te  🤬 " * 50])
    assert proba.shape == (4, 2) and np.all(np.isfinite(proba))
    assert fitted.predict_proba([]).shape == (0, 2)


def test_save_load_gives_identical_probabilities(fitted: TfidfBaseline, tmp_path) -> None:
    texts, _ = _corpus(30, seed=2)
    path = fitted.save(tmp_path / "models" / "baseline.joblib")
    loaded = TfidfBaseline.load(path)
    np.testing.assert_array_equal(loaded.predict_proba(texts), fitted.predict_proba(texts))


def test_training_is_deterministic() -> None:
    texts, y = _corpus(80, seed=3)
    a = TfidfBaseline().fit(texts, y).predict_proba(texts)
    b = TfidfBaseline().fit(texts, y).predict_proba(texts)
    np.testing.assert_array_equal(a, b)


def test_misuse_gives_clear_errors(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        TfidfBaseline().predict_proba(["x"])
    with pytest.raises(TypeError, match="single string"):
        TfidfBaseline().fit("some text", [1])
    with pytest.raises(ValueError, match="both 0 and 1"):
        TfidfBaseline().fit(["a b", "c d"], [1, 1])
    with pytest.raises(ValueError, match="2 texts"):
        TfidfBaseline().fit(["a b", "c d"], [0, 1, 1])
    with pytest.raises(TypeError, match="strings"):
        TfidfBaseline().fit(["a b", None], [0, 1])
    joblib.dump({"not": "a baseline"}, tmp_path / "other.joblib")
    with pytest.raises(ValueError, match="not a TfidfBaseline"):
        TfidfBaseline.load(tmp_path / "other.joblib")
