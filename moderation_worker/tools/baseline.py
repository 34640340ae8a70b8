"""TF-IDF + logistic regression: the cheap model the LoRA-tuned Gemma has to beat.

Word n-grams catch slurs and phrases; character n-grams (within word boundaries) catch
obfuscated spellings ("h4te", "i d i o t") and emoji, which word tokens drop. It trains in
seconds on a CPU, so every Gemma result comes with a "was the big model worth it?" number.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline

FILE_FORMAT = "moderation-worker/tfidf-baseline/1"


def build_pipeline(c: float = 4.0, random_state: int = 0) -> Pipeline:
    """The untrained pipeline; fixed `random_state` so a rerun gives the same model."""
    common: dict[str, Any] = {"sublinear_tf": True, "strip_accents": "unicode", "dtype": np.float32}
    features = FeatureUnion(
        [
            ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), **common)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), **common)),
        ]
    )
    classifier = LogisticRegression(
        C=c, class_weight="balanced", max_iter=2000, random_state=random_state
    )
    return Pipeline([("features", features), ("classifier", classifier)])


class TfidfBaseline:
    """Binary hateful/not-hateful classifier; column 1 of `predict_proba` is p(hateful)."""

    def __init__(self, c: float = 4.0, random_state: int = 0) -> None:
        self.pipeline = build_pipeline(c=c, random_state=random_state)
        self._fitted = False

    def fit(self, texts: Sequence[str], y: Any) -> TfidfBaseline:
        """Train on texts with 0/1 labels (1 = hateful); both classes must be present."""
        texts = _check_texts(texts)
        labels = np.asarray(y)
        if labels.shape != (len(texts),):
            raise ValueError(f"{len(texts)} texts but labels of shape {labels.shape}")
        values = set(np.unique(labels).tolist())
        if values != {0, 1}:
            raise ValueError(f"labels must contain both 0 and 1 (1 = hateful), got {values}")
        try:
            self.pipeline.fit(texts, labels.astype(np.int64))
        except ValueError as exc:
            if "empty vocabulary" in str(exc):
                raise ValueError(
                    "training texts contain no words of 2+ letters (all empty or symbols); "
                    "cannot build the word vocabulary"
                ) from exc
            raise
        self._fitted = True
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """float64 `[N, 2]`: p(not hateful), p(hateful). Empty or emoji-only texts are fine."""
        if not self._fitted:
            raise RuntimeError("TfidfBaseline is not fitted; call fit() or load()")
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, 2))
        return self.pipeline.predict_proba(texts)

    def save(self, path: str | Path) -> Path:
        """Pickle via joblib with the sklearn version, since pickles do not travel across
        versions reliably. Only load files you wrote: unpickling runs code."""
        if not self._fitted:
            raise RuntimeError("refusing to save an unfitted TfidfBaseline")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FILE_FORMAT,
            "sklearn_version": sklearn.__version__,
            "pipeline": self.pipeline,
        }
        joblib.dump(payload, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TfidfBaseline:
        """Load a file written by `save` (trusted files only: this unpickles)."""
        payload = joblib.load(Path(path))
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a TfidfBaseline file")
        if payload["sklearn_version"] != sklearn.__version__:
            warnings.warn(
                f"{path} was saved with scikit-learn {payload['sklearn_version']}, "
                f"running {sklearn.__version__}; predictions may differ",
                stacklevel=2,
            )
        model = cls.__new__(cls)
        model.pipeline = payload["pipeline"]
        model._fitted = True
        return model


def _check_texts(texts: Sequence[str]) -> list[str]:
    """A list of str; a bare string is refused, since iterating it would score characters."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not a single string")
    out = list(texts)
    bad = [i for i, text in enumerate(out) if not isinstance(text, str)]
    if bad:
        raise TypeError(f"texts must be strings; items {bad[:5]} are not")
    return out
