"""Settings of the agile loop: the labels topic, the learner's store, when it trains and when a
candidate may be promoted. A `[loop]` table in the worker's TOML file (or `MODERATION_LOOP__*`
variables), so the learner, the console and the workers read one configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LoopSettings(BaseModel):
    """What `moderation-worker learn` does with moderator labels. Invalid values fail at start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels_topic: str = Field("moderation.labels", min_length=1, description="moderator labels")
    labels_dlq_topic: str = Field(
        "moderation.labels.dlq", min_length=1, description="labels that failed validation"
    )
    group_id: str = Field("moderation-learner", min_length=1, description="the learner's group")
    store_dir: Path = Field(
        Path("learner-store"),
        description="labels, state, history and candidate adapters; workers must read "
        "store_dir/adapters at the same path (a shared volume)",
    )
    # When a classifier trains
    min_new_labels: int = Field(100, ge=1, description="new labels that start a cycle")
    max_interval_s: float | None = Field(
        86_400.0, gt=0, description="a cycle at least this often when any label is new"
    )
    check_interval_s: float = Field(60.0, gt=0, description="how often the learner looks")
    # How the labels are split (fixed per comment id; see loop.labels.split_of)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    # Training the candidate
    init: Literal["current", "scratch"] = Field(
        "current", description="fine-tune from production's adapter, or from a fresh one"
    )
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(5e-4, gt=0, lt=1)
    rank: int = Field(4, ge=1, le=64, description="LoRA rank when training from scratch")
    balance_classes: bool = Field(True, description="weight classes equally in the loss")
    time_budget_s: float = Field(3_600.0, gt=0, description="training stops after this")
    threshold_policy: str = Field("max-f1", description="how the validation rows set it")
    # Promotion
    shadow_s: float = Field(
        600.0, ge=0, description="a candidate is scored in shadow this long before it is decided"
    )
    auto_promote: bool = Field(True, description="False: a person runs `control promote`")
    min_holdout_labels: int = Field(50, ge=2)
    min_holdout_per_class: int = Field(10, ge=1)
    min_gain: float = Field(0.0, ge=0, lt=1, description="ROC-AUC gain the CI must clear")
    trusted_tolerance: float = Field(
        0.0, ge=0, lt=1, description="ROC-AUC loss allowed on labels older than the last cycle"
    )
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000)
    confidence: float = Field(0.95, gt=0.5, lt=1)

    @model_validator(mode="after")
    def _fractions(self) -> LoopSettings:
        if self.holdout_fraction + self.validation_fraction >= 0.9:
            raise ValueError("holdout_fraction + validation_fraction must leave rows to train on")
        if self.labels_topic == self.labels_dlq_topic:
            raise ValueError("labels_topic and labels_dlq_topic must differ")
        return self
