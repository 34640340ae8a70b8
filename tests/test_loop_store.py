"""The learner's label store: durable, crash-tolerant, latest-decision-wins, locked training."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from moderation_worker.loop.labels import ModeratorLabel
from moderation_worker.loop.store import LabelStore, TrainingLocked


def _label(id: str, label: int = 1, classifier: str = "hate", **kw: str) -> ModeratorLabel:
    return ModeratorLabel(id=id, text=f"text of {id}", label=label, classifier=classifier, **kw)


def _lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_append_round_trip_keeps_every_field(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    full = ModeratorLabel(
        id="c1",
        text='ünïcode "quoted"\nnewline',
        label=0,
        classifier="hate",
        community="gaming",
        moderator="mod-7",
        decided_at="2024-05-01T10:00:00+00:00",
    )
    bare = _label("c2")
    other = _label("c3", classifier="spam")

    assert store.append([full, bare, other], sources=["labels/3@1042", None, "labels/0@7"]) == 3

    assert store.records("hate") == [(1, full), (2, bare)]
    assert store.records("spam") == [(1, other)]
    assert store.classifiers() == ["hate", "spam"]
    assert store.records("nothing") == []
    rows = _lines(tmp_path / "labels" / "hate.jsonl")
    assert rows[0]["source"] == "labels/3@1042"
    assert "source" not in rows[1]
    assert "community" not in rows[1]
    for row in rows:
        received = datetime.fromisoformat(row["received_at"])
        assert received.utcoffset() is not None and received.utcoffset().total_seconds() == 0
    assert store.adapters_dir == tmp_path / "adapters" and store.adapters_dir.is_dir()
    for sub in ("state", "history", "locks"):
        assert (tmp_path / sub).is_dir()


def test_append_refuses_mismatched_sources_and_bad_labels(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    with pytest.raises(ValueError):
        store.append([_label("a"), _label("b")], sources=["x"])
    with pytest.raises(ValueError):
        store.append([_label("a", label=2)])
    assert store.count("hate") == 0


def test_seq_increases_and_survives_a_new_store(tmp_path: Path) -> None:
    first = LabelStore(tmp_path)
    assert first.last_seq("hate") == 0
    first.append([_label("a"), _label("b")])
    first.append([_label("x", classifier="spam")])

    second = LabelStore(tmp_path)
    assert second.last_seq("hate") == 2
    second.append([_label("c"), _label("a", label=0)])

    assert [seq for seq, _ in second.records("hate")] == [1, 2, 3, 4]
    assert second.last_seq("hate") == 4 and second.count("hate") == 4
    assert second.last_seq("spam") == 1
    # The first object must not trust a stale in-memory counter.
    first.append([_label("d")])
    assert first.last_seq("hate") == 5


def test_latest_prefers_the_later_decision_when_both_have_one(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    late = _label("c", label=1, decided_at="2024-05-02T00:00:00Z")
    early = _label("c", label=0, decided_at="2024-05-01T00:00:00Z")
    store.append([late, early])  # the earlier decision arrives last
    assert store.latest("hate") == [(1, late)]


def test_latest_falls_back_to_arrival_when_one_lacks_decided_at(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    dated = _label("c", label=1, decided_at="2099-01-01T00:00:00+00:00")
    undated = _label("c", label=0)
    store.append([dated, undated])
    assert store.latest("hate") == [(2, undated)]
    store.append([_label("c", label=1, decided_at="1999-01-01T00:00:00")])
    assert store.latest("hate")[0][0] == 3


def test_latest_tie_goes_to_the_higher_seq_and_naive_means_utc(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    a = _label("tie", label=1, decided_at="2024-05-01T12:00:00+00:00")
    b = _label("tie", label=0, decided_at="2024-05-01T14:00:00+02:00")  # same instant
    naive = _label("tz", label=1, decided_at="2024-05-01T12:00:00")  # 12:00 UTC
    aware = _label("tz", label=0, decided_at="2024-05-01T12:30:00+01:00")  # 11:30 UTC
    store.append([a, b, naive, aware])
    assert store.latest("hate") == [(2, b), (3, naive)]


def test_latest_keeps_one_entry_per_id_sorted_by_seq(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    store.append([_label("x"), _label("y"), _label("x", label=0), _label("z")])
    latest = store.latest("hate")
    assert [(seq, label.id, label.label) for seq, label in latest] == [
        (2, "y", 1),
        (3, "x", 0),
        (4, "z", 1),
    ]


def test_torn_last_line_is_skipped_then_cut_before_the_next_append(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LabelStore(tmp_path)
    store.append([_label("a"), _label("b")])
    path = tmp_path / "labels" / "hate.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"id": "c", "text": "half a rec')  # killed mid-write

    with caplog.at_level(logging.WARNING):
        assert [label.id for _, label in store.records("hate")] == ["a", "b"]
    assert "torn" in caplog.text and "hate.jsonl" in caplog.text
    assert store.last_seq("hate") == 2

    LabelStore(tmp_path).append([_label("c")])
    raw = path.read_bytes()
    assert b"half a rec" not in raw and raw.endswith(b"\n")
    assert [row["seq"] for row in _lines(path)] == [1, 2, 3]


def test_invalid_lines_in_the_middle_are_skipped_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LabelStore(tmp_path)
    store.append([_label("a")])
    path = tmp_path / "labels" / "hate.jsonl"
    with open(path, "ab") as f:
        f.write(b"not json at all\n")
        f.write(b'{"seq": 9, "id": "no text"}\n')  # valid JSON, not a label
    store.append([_label("b")])  # the seq is found past the bad lines

    with caplog.at_level(logging.WARNING):
        records = store.records("hate")
    assert [(seq, label.id) for seq, label in records] == [(1, "a"), (2, "b")]
    assert "hate.jsonl" in caplog.text
    assert "line 2" in caplog.text and "line 3" in caplog.text
    assert store.count("hate") == 2


def test_append_fsyncs_the_written_lines_before_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LabelStore(tmp_path)
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    store.append([_label("a"), _label("b", classifier="spam")])

    for name in ("hate", "spam"):
        path = tmp_path / "labels" / f"{name}.jsonl"
        # Synced when it already held the whole line, i.e. after the flush.
        assert (str(path), path.stat().st_size) in synced
    assert str(tmp_path / "labels") in [p for p, _ in synced]  # new entries reach the disk


def test_state_round_trip_and_missing_is_empty(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    assert store.state("hate") == {}
    store.save_state("hate", {"last_cycle_seq": 40, "production": "hate-0003"})
    store.save_state("hate", {"last_cycle_seq": 80, "production": "hate-0004"})
    assert LabelStore(tmp_path).state("hate") == {"last_cycle_seq": 80, "production": "hate-0004"}
    assert store.state("spam") == {}
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["hate.json"]


def test_state_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LabelStore(tmp_path)
    store.save_state("hate", {"production": "old"})

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        store.save_state("hate", {"production": "new"})
    assert store.state("hate") == {"production": "old"}
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["hate.json"]  # no temp left


def test_corrupt_state_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    (tmp_path / "state" / "hate.json").write_bytes(b"{garbage")
    with pytest.raises(ValueError, match="hate.json"):
        store.state("hate")


def test_history_appends_and_reads_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = LabelStore(tmp_path)
    assert store.history("hate") == []
    store.record_event("hate", {"kind": "cycle", "seq": 40})
    store.record_event("hate", {"kind": "promotion", "adapter": "a1", "at": "2024-05-01T00:00Z"})
    path = tmp_path / "history" / "hate.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"kind": "cyc')
    with caplog.at_level(logging.WARNING):
        events = LabelStore(tmp_path).history("hate")
    assert "torn" in caplog.text
    assert [e["kind"] for e in events] == ["cycle", "promotion"]
    assert datetime.fromisoformat(events[0]["at"]).utcoffset().total_seconds() == 0
    assert events[1]["at"] == "2024-05-01T00:00Z"

    store.record_event("hate", {"kind": "cycle", "seq": 80})
    assert [e.get("seq") for e in store.history("hate")] == [40, None, 80]
    assert path.read_bytes().endswith(b"\n")


def test_training_lock_excludes_a_second_store_until_released(tmp_path: Path) -> None:
    first, second = LabelStore(tmp_path), LabelStore(tmp_path)
    with first.training_lock("hate"):
        with pytest.raises(TrainingLocked, match=rf"'hate'.*pid {os.getpid()}"):
            with second.training_lock("hate"):
                pytest.fail("two holders of one training lock")
        with second.training_lock("spam"):  # other classifiers are independent
            pass
    with second.training_lock("hate"):
        pass
    assert issubclass(TrainingLocked, RuntimeError)


def _lock_in_child(root: str, parent_pid: int) -> None:
    """Exit 0 when locked out naming the parent, 1 when the lock was (wrongly) taken."""
    try:
        with LabelStore(root).training_lock("hate"):
            os._exit(1)
    except TrainingLocked as e:
        os._exit(0 if f"pid {parent_pid}" in str(e) else 2)
    os._exit(3)


def test_training_lock_excludes_another_process(tmp_path: Path) -> None:
    start = time.monotonic()
    ctx = multiprocessing.get_context("fork")
    store = LabelStore(tmp_path)
    with store.training_lock("hate"):
        child = ctx.Process(target=_lock_in_child, args=(str(tmp_path), os.getpid()))
        child.start()
        child.join(timeout=10)
    assert child.exitcode == 0
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("name", ["../x", "A", "", "a/b", "x\n", "-x", "a" * 65, ".."])
def test_bad_classifier_names_are_refused(tmp_path: Path, name: str) -> None:
    store = LabelStore(tmp_path / "store")
    calls = [
        lambda: store.append([_label("a", classifier=name)]),
        lambda: store.records(name),
        lambda: store.latest(name),
        lambda: store.count(name),
        lambda: store.last_seq(name),
        lambda: store.state(name),
        lambda: store.save_state(name, {}),
        lambda: store.record_event(name, {}),
        lambda: store.history(name),
        lambda: store.training_lock(name),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="classifier"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert not any(p.is_file() for p in (tmp_path / "store").rglob("*"))


def test_reset_labels_moves_files_aside_and_starts_empty(tmp_path: Path) -> None:
    store = LabelStore(tmp_path)
    store.append([_label("a"), _label("b"), _label("s", classifier="spam")])

    moved = store.reset_labels()

    assert moved.parent == tmp_path and moved.name.startswith("labels.")
    assert len(_lines(moved / "hate.jsonl")) == 2 and (moved / "spam.jsonl").exists()
    assert store.classifiers() == [] and store.records("hate") == [] and store.count("hate") == 0
    assert LabelStore(tmp_path).latest("hate") == []
    # A rebuild keeps counting, so seqs saved in state stay comparable.
    store.append([_label("a")])
    assert store.records("hate")[0][0] == 3
    assert store.reset_labels() != moved
