"""Settings of the speed features: length-aware batching, the shared-prefix cache and the
cold start. A `[speed]` table in the worker's TOML file, or `MODERATION_SPEED__*` variables
(`MODERATION_SPEED__BATCH_BY_LENGTH=false`). Every default is measured in BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class SpeedSettings(BaseModel):
    """Knobs that change how fast the worker scores, never what it scores (all exact)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_by_length: bool = Field(
        True,
        description="rows wait in one queue per length bucket, so a long comment does not "
        "stretch short ones to its length (acks stay in arrival order per partition)",
    )
    prefix_cache: bool = Field(
        True,
        description="compute the prompt head every row shares once per adapter (its keys "
        "and values), not once per row",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="where compiled shapes persist across restarts (XLA/JAX cache); "
        "None: the default cache folder, '' or 'off': no persistent cache",
    )
