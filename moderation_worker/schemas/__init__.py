"""JSON Schemas of what the worker reads and writes: the input event, the verdict, the dead letter.

They are the contract with producers and consumers of the topics (validate your own records
against them, or generate types from them); tests check every output of the worker against
them. `schema_version` in each output names the version of these files.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

NAMES = ("comment-event", "verdict", "dead-letter")


@cache
def load(name: str) -> dict[str, Any]:
    """The schema called `name` (one of `NAMES`) as a dict."""
    if name not in NAMES:
        raise ValueError(f"unknown schema {name!r}; known: {', '.join(NAMES)}")
    text = resources.files(__package__).joinpath(f"{name}.schema.json").read_text("utf-8")
    return json.loads(text)  # type: ignore[no-any-return]
