"""Settings of the speed features: length-aware batching, the shared-prefix cache and the
cold start. A `[speed]` table in the worker's TOML file, or `MODERATION_SPEED__*` variables
(`MODERATION_SPEED__BATCH_BY_LENGTH=false`). Every default is measured in BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    compile_cache_dir: Literal["off"] | Path | None = Field(
        None,
        description="where compiled shapes persist across restarts (XLA's and JAX's "
        "persistent caches), so a restarted worker loads them instead of compiling again; "
        "None: $MODERATION_CACHE_DIR/compile or ~/.cache/moderation-worker/compile, "
        "'' or 'off': no persistent cache",
    )

    @field_validator("compile_cache_dir", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        """'' and 'off' (any case) both mean off; in a path, `~` is the user's home."""
        if isinstance(value, str) and value.strip().lower() in ("", "off"):
            return "off"
        if isinstance(value, str | Path):
            return Path(value).expanduser()
        return value
