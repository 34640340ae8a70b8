"""The command line end to end on the tiny model: train -> calibrate -> evaluate -> score."""

from __future__ import annotations

import json
import subprocess
import sys

import orjson
import pytest

from moderation_worker.cli import main
from moderation_worker.threshold_source import read_threshold_file

KIND = ["you are lovely and kind", "thanks friend, great video", "nice song today", "hello world"]
MEAN = ["i hate you awful stupid people", "everyone here is terrible", "go away angry idiots"]


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "own.jsonl"
    rows = [{"text": f"{t} {i}", "label": 0} for i, t in enumerate(KIND * 6)]
    rows += [{"text": f"{t} {i}", "label": 1} for i, t in enumerate(MEAN * 8)]
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    return path


@pytest.fixture(scope="module")
def trained(own_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "tiny"
    code = main(
        [
            "train",
            "--model",
            "tiny",
            "--data",
            str(own_data),
            "--epochs",
            "2",
            "--train-batch-size",
            "4",
            "--learning-rate",
            "0.01",
            "--loss",
            "labels",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out.with_name("tiny.lora.h5")


def test_train_writes_weights_and_metadata(trained) -> None:
    meta = json.loads(trained.with_name("tiny.lora.json").read_text())
    assert meta["base_model"] == "tiny-gemma3:0" and meta["rank"] == 4
    assert meta["training"]["epochs"] == 2 and meta["data_sha256"]
    assert 0.0 <= meta["threshold"] <= 1.0 and meta["threshold_policy"] == "max-f1"
    assert "f1" in meta["metrics"]["validation"]


def test_calibrate_writes_the_threshold_file_the_worker_reads(trained, own_data, tmp_path) -> None:
    out = tmp_path / "threshold.toml"
    code = main(
        [
            "calibrate",
            "--model",
            "tiny",
            "--lora",
            str(trained),
            "--data",
            str(own_data),
            "--policy",
            "youden",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = read_threshold_file(out)
    assert data["policy"] == "youden" and data["model"]["lora_sha256"]


def test_evaluate_writes_report_and_plots(trained, own_data, tmp_path) -> None:
    code = main(
        [
            "evaluate",
            "--model",
            "tiny",
            "--lora",
            str(trained),
            "--data",
            str(own_data),
            "--out",
            str(tmp_path),
            "--bootstrap",
            "50",
            "--policy",
            "fpr<=0.1",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("f1", "roc_auc", "precision", "recall", "per_label_accuracy", "confusion_matrix"):
        assert key in report
    assert report["threshold_policy"].startswith("fpr<=0.1")
    for png in ("roc.png", "confusion.png", "scores.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_baseline(own_data, tmp_path) -> None:
    assert (
        main(
            [
                "evaluate",
                "--model",
                "baseline:tfidf",
                "--data",
                str(own_data),
                "--out",
                str(tmp_path),
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"]["base_model"] == "tfidf-logreg" and report["roc_auc"] > 0.9


def test_score_command_through_the_console_script(trained, tmp_path) -> None:
    lines = [
        b'{"id": "a", "text": "you are lovely", "user": "u1"}',
        b"not json",
        b'{"id": "b", "text": ""}',
        b'{"id": "c", "text": "go away angry idiots"}',
        b"\xff\xfe",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moderation_worker.cli",
            "score",
            "--model",
            "tiny",
            "--lora",
            str(trained),
            "--threshold",
            "0.5",
        ],
        input=b"\n".join(lines) + b"\n",
        capture_output=True,
        timeout=300,
        check=True,
    )
    verdicts = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert [v["id"] for v in verdicts] == ["a", "c"]
    assert verdicts[0]["meta"] == {"user": "u1"} and verdicts[0]["threshold"] == 0.5
    assert verdicts[0]["model"]["lora_sha256"]
    records = [orjson.loads(x) for x in proc.stderr.splitlines() if x.startswith(b"{")]
    letters = [x for x in records if "reason" in x and x.get("schema_version") == 1]
    assert sorted(x["reason"] for x in letters) == ["empty_text", "invalid_json", "not_utf8"]


def test_invalid_config_names_the_setting(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MODERATION_BATCH_SIZE", "zero")
    with pytest.raises(SystemExit) as exc:
        main(["config"])
    assert exc.value.code == 2
    assert "batch_size" in capsys.readouterr().err


def test_unknown_model_source_is_a_clear_error(capsys) -> None:
    assert main(["score", "--model", "gpt-17", "/dev/null"]) == 2
    assert "unknown model source" in capsys.readouterr().err
