"""The quality report on the tiny model and the TF-IDF baseline, end to end through the CLI."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from moderation_worker.cli import main
from moderation_worker.tools.quality import Entry

KIND = ["you are lovely and kind", "thanks friend, great video", "nice song today", "hello world"]
MEAN = ["i hate you awful stupid people", "everyone here is terrible", "go away angry idiots"]


def test_entry_parsing() -> None:
    assert Entry.parse("a=gemma3-270m@x.lora.h5") == Entry("a", "gemma3-270m", "x.lora.h5")
    assert Entry.parse("b=tiny").lora is None
    with pytest.raises(ValueError, match="NAME=MODEL"):
        Entry.parse("tiny")


def test_quality_report_end_to_end(tmp_path) -> None:
    data = tmp_path / "own.jsonl"
    rows = [{"text": f"{t} {i}", "label": 0} for i, t in enumerate(KIND * 10)]
    rows += [{"text": f"{t} {i}", "label": 1} for i, t in enumerate(MEAN * 10)]
    data.write_bytes(b"\n".join(orjson.dumps(r) for r in rows))
    out = tmp_path / "report"
    args = [
        "quality",
        "--data",
        str(data),
        "--entry",
        "tfidf=baseline:tfidf",
        "--entry",
        "zero-shot=tiny",
        "--bootstrap",
        "50",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    report = (out / "REPORT.md").read_text()
    assert "| tfidf |" in report and "| zero-shot |" in report and "`fpr<=0.1`" in report
    result = json.loads((out / "quality.json").read_text())
    tfidf = result["entries"][0]
    assert tfidf["test"]["roc_auc"] > 0.9
    assert (
        tfidf["bootstrap"]["f1"]["low"] <= tfidf["test"]["f1"] <= tfidf["bootstrap"]["f1"]["high"]
    )
    for png in ("roc-all.png", "confusion-tfidf.png", "confusion-zero-shot.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    cached = np.load(out / "scores" / "zero-shot.npz")
    assert cached["p_test"].shape == cached["y_test"].shape
    # a second run reuses cached scores and gives the same table
    assert main(args) == 0
    assert (out / "REPORT.md").read_text() == report
