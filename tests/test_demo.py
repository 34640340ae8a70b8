"""`moderation-worker demo`: input assembly and the summary without a broker, then the whole
demo (embedded Tansu + the real worker subprocess on the tiny model, three classifiers and a
live threshold change halfway) end to end, and Ctrl-C.

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
from moderation_worker.settings import ClassifierConfig, Settings
from moderation_worker.tools.demo import (
    SAMPLE_COMMENTS,
    AppliedChange,
    DemoConfig,
    DemoEvent,
    DemoInput,
    LiveChange,
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

SAMPLES = [orjson.loads(line) for line in SAMPLE_COMMENTS.read_bytes().splitlines()]
SAMPLE_IDS = [s["id"] for s in SAMPLES]


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
    # Communities pick the route: some gaming, some news, some none, on both sides of halfway.
    assert [e.community for e in comments] == [s.get("community") for s in SAMPLES]
    assert all(orjson.loads(e.value).get("community") == e.community for e in comments)
    half = len(demo.events) // 2
    for part in (demo.events[:half], demo.events[half:]):
        assert {e.community for e in part} == {"gaming", "news", None}
    assert "communities gaming 15, news 12, none 13" in demo.description


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
    assert {e.community for e in demo.events} == {None}  # the default route


def test_own_jsonl_keeps_its_communities(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [{"text": "a", "community": "gaming"}, {"text": "b"}, {"text": "c", "community": 7}]
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    demo = load_demo_input(path, with_bad_events=False)
    assert [e.community for e in demo.events] == ["gaming", None, None]


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
    # Three classifiers on one base model, routed by community; zero-shot: --lora none.
    assert rebuilt.classifiers == (
        ClassifierConfig(name="hate", lora="none"),
        ClassifierConfig(name="violence", lora="none"),
        ClassifierConfig(name="directed", lora="none", mode="shadow"),
    )
    assert rebuilt.routes == {"gaming": ("hate", "violence", "directed")}
    assert rebuilt.default_route == ("hate", "violence") and rebuilt.routing_field == "community"
    assert rebuilt.control_topic == Settings().control_topic, "embedded: the configured name"

    external = demo_settings(config, "kafka://k:9092", embedded=False, web_port=1)
    assert external.input_topic.startswith("comments-demo-"), "never a production topic"
    assert external.control_topic.startswith(f"{Settings().control_topic}-demo-"), (
        "the live change never reaches a production fleet"
    )
    assert external.session_timeout_s >= 6.0  # Apache Kafka's minimum
    assert normalize_broker_url("a:1,b:2") == "kafka://a:1;kafka://b:2"


def test_demo_classifiers_follow_the_model_and_the_threshold_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODERATION_THRESHOLD", "0.7")  # a one-classifier setting: hate's now
    settings = demo_settings(DemoConfig(), "kafka://127.0.0.1:1", embedded=True, web_port=1)
    assert [(c.name, c.mode, c.lora, c.threshold) for c in settings.classifiers] == [
        ("hate", "enforce", "default", 0.7),
        ("violence", "enforce", "shipped:violence", None),
        ("directed", "shadow", "shipped:directed", None),
    ]
    assert settings.threshold is None, "a worker refuses threshold next to classifiers"
    tiny = demo_settings(DemoConfig(model="tiny"), "kafka://127.0.0.1:1", True, 1)
    assert [c.lora for c in tiny.classifiers] == ["default", "none", "none"]  # nothing shipped
    assert LiveChange().key == "threshold/hate/gaming"


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


def _policy(version: int, gaming: float | None = None) -> dict:
    """A worker's `/health` policy: hate at 0.8 (its LoRA's), with `gaming` from control."""

    def at(value: float, source: str) -> dict:
        return {"value": value, "source": source, "detail": ""}

    def entry(mode: str, value: float, source: str) -> dict:
        return {"mode": mode, "threshold": at(value, source), "community_thresholds": {}}

    hate = entry("enforce", 0.8, "model")
    if gaming is not None:
        hate["community_thresholds"] = {"gaming": at(gaming, "control")}
    return {
        "version": version,
        "default_route": ["hate", "violence"],
        "routes": {"gaming": ["hate", "violence", "directed"]},
        "classifiers": {
            "hate": hate,
            "violence": entry("enforce", 0.6, "model"),
            "directed": entry("shadow", 0.5, "default"),
        },
    }


def _verdict(i: int, p: float, version: int = 0, community: str | None = None, **others) -> dict:
    """A schema-2 verdict: hate scores `p`, violence `others["violence"]` (default 0.1), and a
    gaming comment also gets directed in shadow; thresholds as `_policy(version)` has them."""
    threshold = 0.99 if (version, community) == (1, "gaming") else 0.8
    scores = {"hate": (p, threshold, "enforce"), "violence": (others.get("violence", 0.1), 0.6)}
    if community == "gaming":
        scores["directed"] = (others.get("directed", 0.1), 0.5, "shadow")
    results = {
        name: {"p": s[0], "flagged": s[0] >= s[1], "threshold": s[1], "mode": (*s, "enforce")[2]}
        for name, s in scores.items()
    }
    by = [n for n, r in results.items() if r["flagged"] and r["mode"] == "enforce"]
    return {
        "id": f"c{i}",
        "flagged": bool(by),
        "flagged_by": by,
        "classifiers": results,
        "primary": "hate",
        "community": community,
        "control_version": version,
        "p_hateful": p,
        "hateful": results["hate"]["flagged"],
        "threshold": threshold,
    }


def _report(tmp_path: Path, values: list[dict], labels: list, **kwargs) -> tuple:
    events = tuple(
        DemoEvent(f"c{i}".encode(), b"{}", f"c{i}", label=y) for i, y in enumerate(labels)
    )
    result = StreamResult(
        sent_at={i: 100.0 for i in range(len(events))},
        positions={i: (0, i) for i in range(len(events))},
        outcomes={(0, i): ReadBack("verdict", v, 101.0 + i) for i, v in enumerate(values)},
    )
    for key, value in kwargs.pop("result", {}).items():
        setattr(result, key, value)
    report = build_report(
        DemoInput(events, "test input"),
        result,
        health={"model": {"base_model": "tiny", "lora_sha256": None}, "threshold": 0.8},
        metrics_text=None,
        config=DemoConfig(model="tiny", out=tmp_path / "v.jsonl"),
        broker="b",
        embedded=True,
        worker_log=tmp_path / "w.log",
        **kwargs,
    )
    return report, render_table(report)


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
    assert (report.flagged, report.flagged_by, report.primary) == (1, {"hate": 1}, "hate")
    table = render_table(report)
    assert "1 MISSING" in table and "when the demo timed out: c3" in table
    assert "2 duplicate(s) ignored" in table and "zero-shot (no shipped LoRA)" in table
    assert "live change        none (--no-live-change)" in table
    assert "3 verdicts under version 0 (1 flagged)" in table


def test_flagged_is_the_decision_and_the_roc_auc_ranks_the_primary_score(tmp_path: Path) -> None:
    # violence flags c1 (label 0): `flagged` says so, and F1 counts it; hate's p ranks perfectly.
    values = [_verdict(0, 0.9), _verdict(1, 0.2, violence=0.9), _verdict(2, 0.1)]
    report, table = _report(tmp_path, values, [1, 0, 0])
    assert report.flagged == 2 and report.flagged_by == {"hate": 1, "violence": 1}
    assert report.f1 == pytest.approx(2 / 3) and report.roc_auc == 1.0
    assert "2 of 3 (66.7%); flagged_by hate 1, violence 1" in table
    assert "ROC-AUC of hate's p" in table


def test_summary_shows_the_live_change_per_version_and_shadow_results_apart(
    tmp_path: Path,
) -> None:
    values = [
        _verdict(0, 0.95, 0, "gaming", directed=0.7),  # before: hate flags, directed in shadow
        _verdict(1, 0.10, 0, None),
        _verdict(2, 0.90, 0, "news", violence=0.7),
        _verdict(3, 0.95, 1, "gaming", directed=0.7),  # after: 0.95 < 0.99, no longer flagged
        _verdict(4, 0.995, 1, "gaming"),  # still flagged
        _verdict(5, 0.90, 1, "news"),  # another community keeps 0.8
        _verdict(6, 0.20, 1, None, violence=0.7),
    ]
    live = AppliedChange(
        key="threshold/hate/gaming",
        classifier="hate",
        community="gaming",
        threshold=0.99,
        topic="moderation.control",
        offset=0,
        version_before=0,
        version_after=1,
        after_events=3,
        seconds_to_apply=0.25,
        policy_before=_policy(0),
        policy_after=_policy(1, gaming=0.99),
    )
    report, table = _report(
        tmp_path, values, [1, 0, 1, 1, 1, 1, 0], live_change=live, result={"paused_s": 1.0}
    )
    control = report.control
    assert control["verdicts_by_version"] == {"0": 3, "1": 4}
    assert sum(control["verdicts_by_version"].values()) == report.verdicts
    change = control["change"]
    assert (change["results_in_scope"], change["no_longer_flagged"], change["newly_flagged"]) == (
        2, 1, 0,
    )  # fmt: skip
    assert change["changed_verdicts"] == 1 and change["threshold_before"]["value"] == 0.8
    rows = {r["name"]: r for r in report.classifiers}
    assert [(r["mode"], r["scored"], r["flagged"]) for r in rows.values()] == [
        ("enforce", 7, 4),
        ("enforce", 7, 2),
        ("shadow", 3, 2),
    ]
    assert rows["directed"]["in_flagged_by"] == 0
    assert report.shadow == {
        "results": 3,
        "flagged": 2,
        "in_flagged_by": 0,
        "decided_alone": 0,
        "only_shadow_flagged": 1,
    }
    assert report.communities == {"gaming": 3, "news": 2, "(none)": 2}
    assert report.events_per_s == pytest.approx(7 / 6.0), "the midway pause is left out"
    for text in (
        "threshold/hate/gaming: 0.800 (model) -> 0.990 (control)",
        "0 -> 1: 3 verdicts under version 0 (2 flagged); 4 verdicts under version 1 (3 flagged)",
        "of 2 hate results in gaming under version 1, 1 no longer flagged",
        "`flagged` changed for 1 comment(s)",
        "0.800 (model); gaming 0.800 (model) -> 0.990 (control)",
        "(1 where no enforced classifier did); published, never decisive: none in `flagged`",
        "gaming 3, news 2, no community 2",
        "gaming: hate, violence, directed; other: hate, violence",
    ):
        assert text in table, table


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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """The demo as a newcomer runs it (tiny model), once for the tests that read its output."""
    out = tmp_path_factory.mktemp("demo") / "verdicts.jsonl"
    run = subprocess.run(
        _demo_command(out), cwd=REPO_ROOT, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run, out


@pytest.mark.broker
def test_demo_accounts_for_every_event_and_prints_the_summary(demo_run) -> None:
    run, out = demo_run
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
    assert summary["model"] == "tiny-gemma3:0, 3 classifier(s) on one backbone (per-row LoRA)"
    assert summary["events_per_s"] > 0 and summary["paused_s"] > 0

    verdicts = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(verdicts) == 40 and [v["id"] for v in verdicts] == SAMPLE_IDS
    assert all(0.0 <= v["p_hateful"] <= 1.0 and v["meta"]["label"] in (0, 1) for v in verdicts)
    assert summary["flagged"] == sum(v["flagged"] for v in verdicts)
    assert summary["primary"] == "hate" and {v["primary"] for v in verdicts} == {"hate"}

    table = run.stdout
    assert table.startswith("moderation-worker demo: summary")
    for row in ("events produced    42", "verdicts           40", "empty_text 1", "F1 / ROC-AUC"):
        assert row in table, table
    assert "loading model tiny" in run.stderr


@pytest.mark.broker
def test_demo_changes_a_threshold_halfway_and_shadow_never_decides(demo_run) -> None:
    run, out = demo_run
    summary = orjson.loads((out.parent / "summary.json").read_bytes())
    verdicts = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    by_id = {s["id"]: s for s in SAMPLES}

    # Published after half the events (21 of 42) came back; applied before the rest was produced.
    change = summary["control"]["change"]
    assert (change["key"], change["threshold"], change["after_events"]) == (
        "threshold/hate/gaming", 0.99, 21,
    )  # fmt: skip
    assert (change["version_before"], change["version_after"]) == (0, change["offset"] + 1)
    counts = summary["control"]["verdicts_by_version"]
    assert counts == {"0": 20, str(change["version_after"]): 20}, counts
    assert sum(counts.values()) == summary["verdicts"] == len(verdicts)
    assert "publishing threshold/hate/gaming = 0.99" in run.stderr
    for i, v in enumerate(verdicts):
        hate = v["classifiers"]["hate"]
        assert v["control_version"] == (0 if i < 20 else change["version_after"])
        assert v["community"] == by_id[v["id"]].get("community")
        if v["community"] == "gaming" and i >= 20:
            assert (hate["threshold"], hate["threshold_source"]) == (0.99, "control")
        else:
            assert hate["threshold_source"] != "control"

    # Routes: gaming gets all three; directed (shadow) is reported, never decides.
    rows = {r["name"]: r for r in summary["classifiers"]}
    assert [(n, r["mode"], r["scored"]) for n, r in rows.items()] == [
        ("hate", "enforce", 40),
        ("violence", "enforce", 40),
        ("directed", "shadow", 15),
    ]
    for v in verdicts:
        gaming = v["community"] == "gaming"
        assert set(v["classifiers"]) == (
            {"hate", "violence", "directed"} if gaming else {"hate", "violence"}
        )
        assert "directed" not in v["flagged_by"]
        enforced = [n for n in ("hate", "violence") if v["classifiers"][n]["flagged"]]
        assert v["flagged_by"] == enforced and v["flagged"] == bool(enforced)
    assert summary["shadow"]["results"] == 15 and summary["shadow"]["in_flagged_by"] == 0
    assert summary["shadow"]["decided_alone"] == 0

    table = run.stdout
    for row in (
        "live change        threshold/hate/gaming",
        "control versions   0 -> 1",
        "directed",
    ):
        assert row in table, table


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
        # A test run started as a background job (`make test &`, nohup) ignores SIGINT, and
        # children inherit that: give the demo the terminal's Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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
