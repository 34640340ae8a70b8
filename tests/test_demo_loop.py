"""The demo's `--loop` act: one real turn of the loop on the tiny model and an embedded broker."""

from __future__ import annotations

import orjson
import pytest

from moderation_worker.tools.demo.loop_act import run_loop_act

pytestmark = pytest.mark.broker


def test_the_loop_act_trains_judges_and_promotes_a_candidate() -> None:
    lines: list[str] = []
    outcome = run_loop_act(say=lines.append)
    text = "\n".join(lines)
    assert outcome["promoted"], text
    # candidate (shadow), then the promotion (adapter record) and the candidate's tombstone
    assert outcome["records"] == 3, text
    records = [line.split(None, 2) for line in lines if line.startswith("     ")]
    assert [r[1] for r in records] == ["candidate/hate", "adapter/hate", "candidate/hate"]
    adapter = orjson.loads(records[1][2]) if records[1][2].endswith("}") else None
    assert records[2][2] == "null"
    assert "Promote" in text or "promote" in text
    assert adapter is None or adapter["by"] == "learner"
