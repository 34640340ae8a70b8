"""A deterministic `ProbabilityModel` with no neural network.

It lets the worker run end to end where a real model would be slow or absent: unit and broker
tests, and measuring the pipeline's own ceiling (events/s with a model that costs nothing).
The score is a keyword count plus a small hash-based jitter, so the same text always gets the
same probability and different texts spread over (0, 1).

It can also misbehave on purpose, for tests and demos of the dead-letter path: `poison_marker`
makes any batch containing that substring raise, and `delay_s` makes every call take that long
(like a model busy on a GPU), and `fail_after_calls` makes every call after that many raise
(like a model that lost its GPU).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Sequence

import numpy as np

from moderation_worker.events import ModelIdentity

DEFAULT_KEYWORDS = ("hate", "kill", "idiot", "stupid", "scum", "vermin", "trash", "die")


class PoisonedText(ValueError):
    """Raised for a batch that contains the configured poison marker."""


class ModelBroken(RuntimeError):
    """Raised by every call once `fail_after_calls` calls have been made."""


class TrivialScorer:
    """Keyword + hash scorer shaped like the real classifier (labels, identity, batch size).

    Args:
        batch_size: rows per call; calls with another row count are rejected, like a compiled graph.
        keywords: lower-case words that push a text towards the positive label.
        poison_marker: if set, a call whose texts contain it raises `PoisonedText`.
        delay_s: seconds each call sleeps, to imitate model latency.
        fail_after_calls: if set, every call after this many raises `ModelBroken`.
        hang_marker: if set, a call whose texts contain it sleeps `hang_s` (a hung model).
        hang_s: how long a hung call sleeps.

    Example:
        scorer = TrivialScorer(batch_size=8)
        probs = scorer.predict_proba(["you are scum"] + ["nice"] * 7)  # [8, 2], rows sum to 1
    """

    labels: tuple[str, ...] = ("not_hateful", "hateful")
    positive_label: str = "hateful"

    def __init__(
        self,
        batch_size: int = 8,
        keywords: Iterable[str] = DEFAULT_KEYWORDS,
        poison_marker: str | None = None,
        delay_s: float = 0.0,
        fail_after_calls: int | None = None,
        hang_marker: str | None = None,
        hang_s: float = 3600.0,
    ) -> None:
        self.batch_size = batch_size
        self.keywords = tuple(k.lower() for k in keywords)
        self.poison_marker = poison_marker
        self.delay_s = delay_s
        self.fail_after_calls = fail_after_calls
        self.hang_marker = hang_marker
        self.hang_s = hang_s
        self.identity = ModelIdentity(base_model="trivial-keyword-scorer", lora_sha256=None)
        self.calls = 0

    def p_hateful(self, text: str) -> float:
        """Probability of the positive label for one text; pure and deterministic."""
        lowered = text.lower()
        hits = sum(lowered.count(k) for k in self.keywords)
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).digest()
        jitter = int.from_bytes(digest, "big") / 2**32 - 0.5  # [-0.5, 0.5)
        return 1.0 / (1.0 + math.exp(-(2.5 * hits - 2.0 + jitter)))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """`[len(texts), 2]` float32 probabilities; the fixed batch shape is enforced."""
        self.calls += 1
        if len(texts) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} texts, got {len(texts)}")
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.hang_marker is not None and any(self.hang_marker in t for t in texts):
            time.sleep(self.hang_s)
        if self.fail_after_calls is not None and self.calls > self.fail_after_calls:
            raise ModelBroken(f"model broke after {self.fail_after_calls} calls")
        if self.poison_marker is not None and any(self.poison_marker in t for t in texts):
            raise PoisonedText(f"text contains the poison marker {self.poison_marker!r}")
        p = np.array([self.p_hateful(t) for t in texts], dtype=np.float32)
        return np.stack([1.0 - p, p], axis=1)


#: Keyword classifiers of `TrivialClassifierSet` by default: hate, plus violence and spam.
DEFAULT_CLASSIFIERS = {
    "hate": DEFAULT_KEYWORDS,
    "violence": ("kill", "die", "break your", "shoot", "burn"),
    "spam": ("buy now", "free money", "click here"),
}


class TrivialClassifierSet:
    """Several keyword classifiers as one `RowModel`: the multi-classifier worker, no network.

    Each row is scored by its own classifier's keywords in the same call, as `ClassifierSet`
    scores each row with its own adapter; broker tests use it to check routing, per-classifier
    thresholds, shadow mode and the control topic quickly.

    Args:
        classifiers: name -> keywords (default `DEFAULT_CLASSIFIERS`).
        batch_size: rows per call; calls with another row count are rejected.
        delay_s: seconds each call sleeps, to imitate model latency.
    """

    def __init__(
        self,
        classifiers: dict[str, Iterable[str]] | None = None,
        batch_size: int = 8,
        delay_s: float = 0.0,
    ) -> None:
        spec = classifiers or DEFAULT_CLASSIFIERS
        self.members = {n: TrivialScorer(batch_size, keywords=k) for n, k in spec.items()}
        self.names = tuple(self.members)
        self.batch_size = batch_size
        self.delay_s = delay_s
        self.calls = 0

    def predict_rows(self, texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
        self.calls += 1
        if len(texts) != self.batch_size or len(names) != self.batch_size:
            raise ValueError(f"expected {self.batch_size} rows, got {len(texts)}")
        if self.delay_s:
            time.sleep(self.delay_s)
        rows = zip(texts, names, strict=True)
        p = np.array([self.members[n].p_hateful(t) for t, n in rows], np.float32)
        return np.stack([1.0 - p, p], axis=1)

    def identity_of(self, name: str) -> ModelIdentity:
        return ModelIdentity(base_model="trivial-keyword-scorer", lora_sha256=None)

    def labels_of(self, name: str) -> tuple[str, str]:
        return ("ok", name)

    def canary_rows(self) -> list[tuple[str, str]]:
        return [("hello", self.names[0])]

    def calibrated_thresholds(self) -> dict[str, float | None]:
        return dict.fromkeys(self.names)
