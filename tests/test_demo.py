"""`moderation-worker demo`: input assembly and the summary without a broker, then the whole
demo (embedded Tansu + the real worker subprocess on the tiny model) end to end, and Ctrl-C.

The end-to-end tests run the command exactly as a newcomer would, in a subprocess, so they also
cover the CLI wiring, the stdout table and the shutdown of every child process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from moderation_worker.events import EMPTY_TEXT, INVALID_JSON
from moderation_worker.settings import Settings
from moderation_worker.tools.demo import (
    SAMPLE_COMMENTS,
    DemoConfig,
    DemoEvent,
    DemoInput,
    ReadBack,
    StreamResult,
    batch_fill_from_metrics,
    build_report,
    demo_settings,
    load_demo_input,
    model_description,
    normalize_broker_url,
    render_table,
    worker_environment,
)
from tests.fixtures_broker import BROKER_ENV, REPO_ROOT

SAMPLE_IDS = [orjson.loads(line)["id"] for line in SAMPLE_COMMENTS.read_bytes().splitlines()]


# ---------------------------------------------------------------------------------------------
# Without a broker
# ---------------------------------------------------------------------------------------------


def test_builtin_input_has_labelled_samples_and_two_bad_events_inside_the_stream() -> None:
    demo = load_demo_input()
    assert len(demo.events) == 42 and demo.comments == 40 and demo.labelled
    reasons = [(i, e.expected_reason) for i, e in enumerate(demo.events) if e.expected_reason]
    assert [r for _, r in reasons] == [INVALID_JSON, EMPTY_TEXT]
    assert all(0 < i < len(demo.events) - 1 for i, _ in reasons), "bad events mid-stream"
    comments = [e for e in demo.events if e.expected_reason is None]
    assert [e.id for e in comments] == SAMPLE_IDS
    assert all(e.key == e.id.encode() and e.label in (0, 1) for e in comments)
    assert orjson.loads(comments[0].value)["label"] == comments[0].label


def test_limit_counts_comments_and_bad_events_can_be_left_out() -> None:
    assert len(load_demo_input(limit=5).events) == 7
    only = load_demo_input(limit=5, with_bad_events=False)
    assert [e.id for e in only.events] == SAMPLE_IDS[:5]
    with pytest.raises(ValueError, match="limit"):
        load_demo_input(limit=0)


def test_own_csv_without_labels_or_ids_gets_generated_ids(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("text\nfirst comment\nsecond comment\n", encoding="utf-8")
    demo = load_demo_input(path, with_bad_events=False)
    assert [e.id for e in demo.events] == ["demo-00000", "demo-00001"]
    assert not demo.labelled and "(labelled)" not in demo.description


def test_ethos_streams_its_test_split(tmp_path: Path) -> None:
    path = tmp_path / "ethos.csv"
    rows = [f"comment number {i};{(i % 3) / 2}" for i in range(850)]
    path.write_text("comment;isHate\n" + "\n".join(rows) + "\n", encoding="utf-8")
    demo = load_demo_input(ethos=path, with_bad_events=False)
    assert len(demo.events) == 50 and demo.labelled  # 850 rows - 800 train rows
    assert demo.events[0].id == "ethos-test-000"


def test_worker_environment_spells_out_exactly_the_demo_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODERATION_BATCH_SIZE", "3")  # the user's environment is the base...
    monkeypatch.setenv("MODERATION_METRICS_PORT", "9999")  # ...but a port clash is not inherited
    config = DemoConfig(model="tiny", lora=None, batch_size=4)
    settings = demo_settings(config, "kafka://127.0.0.1:1", embedded=True, web_port=1234)
    env = worker_environment(settings)
    assert env["MODERATION_LORA_WEIGHTS"] == "none" and "MODERATION_METRICS_PORT" not in env
    assert env["MODERATION_SESSION_TIMEOUT_S"] == "3.0"  # Tansu's join quirk
    assert settings.input_topic == Settings().input_topic, "embedded: configured names"
    for key in [k for k in os.environ if k.startswith("MODERATION_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("MODERATION_"):
            monkeypatch.setenv(key, value)
    rebuilt = Settings()
    assert rebuilt.public_dict() == {**settings.public_dict(), "lora_weights": "none"}
    assert rebuilt.batch_size == 4 and rebuilt.web_port == 1234

    external = demo_settings(config, "kafka://k:9092", embedded=False, web_port=1)
    assert external.input_topic.startswith("comments-demo-"), "never a production topic"
    assert external.session_timeout_s >= 6.0  # Apache Kafka's minimum
    assert normalize_broker_url("a:1,b:2") == "kafka://a:1;kafka://b:2"


def test_model_description_says_zero_shot_plainly() -> None:
    text, _, sha = model_description(
        {"base_model": "gemma3-270m", "lora_sha256": None}, "gemma3-270m", "default"
    )
    assert text == "gemma3-270m, zero-shot (no shipped LoRA weights)" and sha is None
    text, _, _ = model_description({"base_model": "g", "lora_sha256": None}, "g", None)
    assert "zero-shot (--lora none)" in text
    text, _, sha = model_description({"base_model": "g", "lora_sha256": "ab" * 32}, "g", "default")
    assert text == "g + LoRA sha256 abababababab (shipped)" and sha == "ab" * 32


def test_batch_fill_is_the_mean_of_the_worker_histogram() -> None:
    page = (
        "# HELP moderation_batch_fill_ratio Real rows over the fixed batch size\n"
        "# TYPE moderation_batch_fill_ratio histogram\n"
        'moderation_batch_fill_ratio_bucket{le="1.0"} 4.0\n'
        'moderation_batch_fill_ratio_bucket{le="+Inf"} 4.0\n'
        "moderation_batch_fill_ratio_count 4.0\n"
        "moderation_batch_fill_ratio_sum 3.5\n"
    )
    assert batch_fill_from_metrics(page) == (0.875, 4)
    assert batch_fill_from_metrics(None) == (None, None)


def _verdict(i: int, p: float) -> dict:
    return {"id": f"c{i}", "p_hateful": p, "hateful": p >= 0.5, "label": "x", "threshold": 0.5}


def test_report_counts_every_event_once_and_names_what_is_missing(tmp_path: Path) -> None:
    events = tuple(DemoEvent(f"c{i}".encode(), b"{}", f"c{i}", label=i % 2) for i in range(4))
    events += (DemoEvent(b"bad", b"{", None, expected_reason=INVALID_JSON),)
    result = StreamResult(
        sent_at={i: 100.0 for i in range(5)},
        positions={i: (0, i) for i in range(5)},
        outcomes={
            (0, 0): ReadBack("verdict", _verdict(0, 0.1), 101.0),
            (0, 1): ReadBack("verdict", _verdict(1, 0.9), 102.0),
            (0, 2): ReadBack("verdict", _verdict(2, 0.2), 103.0),
            (0, 4): ReadBack("dead_letter", {"reason": INVALID_JSON}, 104.0),
        },
        duplicates=2,
        timed_out=True,
    )
    report = build_report(
        DemoInput(events, "test input"),
        result,
        health={"model": {"base_model": "tiny", "lora_sha256": None}, "threshold": 0.5},
        metrics_text=None,
        config=DemoConfig(model="tiny", out=tmp_path / "v.jsonl"),
        broker="b",
        embedded=True,
        worker_log=tmp_path / "w.log",
    )
    assert (report.events, report.verdicts, report.dead_letters) == (5, 3, {INVALID_JSON: 1})
    assert report.missing_ids == ["c3"] and not report.complete and report.accounted == 4
    assert report.f1 == 1.0 and report.roc_auc == 1.0 and report.labelled == 3
    assert report.latency_p50_s == pytest.approx(2.5) and report.events_per_s == 1.0
    table = render_table(report)
    assert "1 MISSING" in table and "when the demo timed out: c3" in table
    assert "2 duplicate(s) ignored" in table and "zero-shot (no shipped LoRA weights)" in table


# ---------------------------------------------------------------------------------------------
# Through the real broker and the real worker
# ---------------------------------------------------------------------------------------------


def _demo_command(out: Path, *extra: str) -> list[str]:
    command = [sys.executable, "-m", "moderation_worker.cli", "demo", "--model", "tiny"]
    command += ["--out", str(out), *extra]
    if os.environ.get(BROKER_ENV):
        command += ["--broker", os.environ[BROKER_ENV]]
    return command


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.broker
def test_demo_accounts_for_every_event_and_prints_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "demo" / "verdicts.jsonl"
    run = subprocess.run(
        _demo_command(out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = orjson.loads((out.parent / "summary.json").read_bytes())
    assert summary["events"] == 42 and summary["complete"]
    assert summary["verdicts"] + sum(summary["dead_letters"].values()) == summary["events"]
    assert summary["verdicts"] == 40 and summary["missing"] == 0
    assert summary["dead_letters"] == {EMPTY_TEXT: 1, INVALID_JSON: 1}
    assert summary["dead_letters"] == summary["expected_dead_letters"]
    assert summary["f1"] is not None and summary["roc_auc"] is not None
    assert summary["labelled"] == 40 and summary["batch_fill_ratio"] is not None
    assert 0 < summary["batch_fill_ratio"] <= 1 and summary["model_batches"] >= 1
    assert summary["latency_p50_s"] <= summary["latency_p99_s"]
    assert summary["model"] == "tiny-gemma3:0, zero-shot (no shipped LoRA weights)"

    verdicts = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(verdicts) == 40 and [v["id"] for v in verdicts] == SAMPLE_IDS
    assert all(0.0 <= v["p_hateful"] <= 1.0 and v["meta"]["label"] in (0, 1) for v in verdicts)

    table = run.stdout
    assert table.startswith("moderation-worker demo: summary")
    for row in ("events produced    42", "verdicts           40", "empty_text 1", "F1 / ROC-AUC"):
        assert row in table, table
    assert "loading model tiny" in run.stderr


@pytest.mark.broker
def test_ctrl_c_mid_stream_stops_the_worker_and_the_broker(tmp_path: Path) -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc to find child processes")
    proc = subprocess.Popen(
        _demo_command(tmp_path / "verdicts.jsonl", "--rate", "2"),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    streaming = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "producing" in line:
                streaming.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert streaming.wait(120), "".join(lines)
        time.sleep(1.0)  # a few events in flight
        children = _descendants(proc.pid)
        expected = 2 if not os.environ.get(BROKER_ENV) else 1  # worker (+ embedded broker)
        assert len(children) >= expected, children
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    assert not [pid for pid in children if _alive(pid)], "orphan processes left behind"
    assert any("interrupted" in line for line in lines), "".join(lines)


def test_worker_environment_passes_the_sasl_secret_itself_not_the_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in {
        "SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "SASL_MECHANISM": "SCRAM-SHA-512",
        "SASL_USERNAME": "alice",
        "SASL_PASSWORD": "s3cret-value",
    }.items():
        monkeypatch.setenv(f"MODERATION_{key}", value)
    config = DemoConfig(model="tiny", lora=None, batch_size=4)
    settings = demo_settings(config, "kafka://k:9092", embedded=False, web_port=1)
    assert "s3cret-value" not in str(settings.public_dict())
    assert worker_environment(settings)["MODERATION_SASL_PASSWORD"] == "s3cret-value"
