"""`score` runs the worker's own pipeline over a file: one output per line, in order."""

from __future__ import annotations

import io

import orjson

from moderation_worker.tools.score import JsonLinesSink, score_lines
from moderation_worker.tools.trivial_scorer import TrivialScorer


def test_every_line_gets_one_output_with_the_workers_rules() -> None:
    lines = [
        b'{"id": "a", "text": "you idiot", "user": "u1"}\n',
        b"\n",  # blank lines are not events
        b"not json\n",
        b'{"id": "b", "text": "POISON here"}\n',
        *[orjson.dumps({"id": f"c{i}", "text": f"fine {i}"}) + b"\n" for i in range(9)],
    ]
    out, err = io.BytesIO(), io.BytesIO()
    model = TrivialScorer(batch_size=4, poison_marker="POISON")  # rejects any other row count
    counts = score_lines(lines, model, 0.5, JsonLinesSink(out, err), source_name="in.jsonl")
    verdicts = [orjson.loads(x) for x in out.getvalue().splitlines()]
    letters = [orjson.loads(x) for x in err.getvalue().splitlines()]
    assert counts == {"verdicts": 10, "dead_letters": 2}
    assert [v["id"] for v in verdicts] == ["a"] + [f"c{i}" for i in range(9)]
    assert verdicts[0]["meta"] == {"user": "u1"} and verdicts[0]["source"]["offset"] == 0
    assert verdicts[0]["source"]["topic"] == "in.jsonl"
    assert {x["reason"]: x["source"]["offset"] for x in letters} == {
        "invalid_json": 2,
        "scoring_failed": 3,  # bisected out of its batch, as in the worker
    }
    assert model.calls >= 4
