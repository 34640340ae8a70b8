"""Settings of the moderator console (`moderation-worker console`): where it listens, who may
use it, and what it keeps. A `[console]` table in the worker's TOML file, or
`MODERATION_CONSOLE__*` variables (`MODERATION_CONSOLE__USERS='{"ana": "a-long-token"}'`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class ConsoleSettings(BaseModel):
    """Who may change thresholds and give labels, and how much of the stream the page shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="listen address; 0.0.0.0 only behind TLS/auth")
    port: int = Field(8090, ge=0, le=65535)
    users: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="user name -> access token; empty: a random token for 'admin', printed",
    )
    group_id: str = Field("moderation-console", min_length=1, description="its consumer group")
    recent: int = Field(2000, ge=10, le=1_000_000, description="verdicts kept in memory")
    window_s: float = Field(300.0, gt=0, description="rates and flags/hour over this window")
    queue_random_share: float = Field(
        0.2, ge=0, le=1, description="share of the review queue drawn at random (honest estimate)"
    )
    calibration: dict[str, Path] = Field(
        default_factory=dict,
        description="classifier -> JSONL of {p, label} rows (e.g. its validation scores)",
    )

    @field_validator("users")
    @classmethod
    def _tokens(cls, users: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, token in users.items():
            if not name or len(name) > 64 or not name.isprintable():
                raise ValueError(f"user name {name!r} must be 1-64 printable characters")
            if len(token.get_secret_value()) < 16:
                raise ValueError(f"the token of {name!r} must have at least 16 characters")
        return users
