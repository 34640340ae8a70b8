"""The learner's durable label store: append-only JSON-lines files in one directory.

The learner commits its Kafka offsets only after `LabelStore.append` returns, and `append`
fsyncs before returning, so a learner crash loses no labels (at worst a batch is appended
twice, which `latest` collapses). Files stay readable after a crash mid-write: a torn last
line is skipped on read and cut off before the next append to that file.

Layout under `root`: `labels/<classifier>.jsonl`, `state/<classifier>.json`,
`history/<classifier>.jsonl`, `adapters/`, `locks/<classifier>.lock`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from moderation_worker.loop.labels import ModeratorLabel

__all__ = ["CLASSIFIER_NAME", "LabelStore", "TrainingLocked", "check_classifier"]

log = logging.getLogger(__name__)

#: Names become file names, so only this shape is ever joined into a path (`fullmatch`).
CLASSIFIER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
#: After `reset_labels`, the last seq of each classifier, so seqs keep increasing.
_SEQ_BASE = ".seq_base.json"
_LABEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModeratorLabel))
_BLOCK = 64 * 1024


class TrainingLocked(RuntimeError):
    """Another learner (process or store object) is training this classifier right now."""


def check_classifier(name: object) -> str:
    """Refuse any name that could escape its directory (`../x`) or collide (`A` vs `a`)."""
    if not isinstance(name, str) or not CLASSIFIER_NAME.fullmatch(name):
        raise ValueError(f"invalid classifier name {name!r}: must match {CLASSIFIER_NAME.pattern}")
    return name


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _fsync_dir(path: Path) -> None:
    """Make a created, renamed or replaced directory entry survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _label_from(obj: Any, classifier: str) -> tuple[int, ModeratorLabel]:
    """A stored line back into (seq, label); ValueError for anything we did not write."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    seq = obj.get("seq")
    if type(seq) is not int or seq < 1:
        raise ValueError(f"bad seq {seq!r}")
    fields = {k: v for k, v in obj.items() if k in _LABEL_FIELDS}
    label = ModeratorLabel(**fields)
    _check_label(label)
    if label.classifier != classifier:
        raise ValueError(f"classifier {label.classifier!r} in the file of {classifier!r}")
    return seq, label


def _check_label(label: ModeratorLabel) -> None:
    """Refuse on append what the reader would skip, so nothing is written only to be lost."""
    if not isinstance(label.id, str) or not isinstance(label.text, str):
        raise ValueError("id and text must be strings")
    if type(label.label) is not int or label.label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label.label!r}")
    for name in ("community", "moderator", "decided_at"):
        value = getattr(label, name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a string or absent")


def _decided(label: ModeratorLabel) -> datetime | None:
    """`decided_at` as an aware time; naive means UTC; unparseable counts as absent."""
    if label.decided_at is None:
        return None
    try:
        at = datetime.fromisoformat(label.decided_at)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _supersedes(new: tuple[int, ModeratorLabel], old: tuple[int, ModeratorLabel]) -> bool:
    """Latest decision wins: by `decided_at` when both have one (tie: seq), else by seq.

    Moderators' decisions can arrive out of order (several partitions, a replay), so the
    decision time is trusted when both sides state it; arrival order is the fallback.
    """
    new_at, old_at = _decided(new[1]), _decided(old[1])
    if new_at is not None and old_at is not None and new_at != old_at:
        return new_at > old_at
    return new[0] > old[0]


def _complete_lines(f: IO[bytes], end: int) -> Iterator[bytes]:
    """Newline-terminated lines of `f[:end]`, last first, reading backwards in blocks."""
    pos, rest = end, b""
    while pos > 0:
        start = max(0, pos - _BLOCK)
        f.seek(start)
        chunk = f.read(pos - start) + rest
        pos = start
        parts = chunk.split(b"\n")
        rest = parts[0]
        yield from reversed(parts[1:])
    if rest:
        yield rest


def _torn_tail_start(f: IO[bytes]) -> int:
    """Offset where the unterminated last line starts (the file size when there is none)."""
    pos = f.seek(0, os.SEEK_END)
    while pos > 0:
        start = max(0, pos - _BLOCK)
        f.seek(start)
        newline = f.read(pos - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        pos = start
    return 0


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) per valid line; torn tail and bad lines skipped, logged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail:
        log.warning("%s: skipping torn last line %d (%d bytes)", path, len(lines) + 1, len(tail))
    for number, line in enumerate(lines, start=1):
        try:
            yield number, orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("%s: skipping invalid line %d", path, number)


@contextlib.contextmanager
def _appending(path: Path) -> Iterator[IO[bytes]]:
    """`path` opened for append under an exclusive flock, torn tail cut, fsynced on exit.

    The flock serialises appenders (two learners, or threads) so seqs never interleave.
    """
    created = not path.exists()
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            size = f.seek(0, os.SEEK_END)
            keep = _torn_tail_start(f)
            if keep < size:
                log.warning("%s: cutting torn last line (%d bytes)", path, size - keep)
                f.truncate(keep)
            yield f
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    if created:
        _fsync_dir(path.parent)


class LabelStore:
    """Labels, learner state, audit history and training locks of the agile loop, on disk."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.labels_dir = self.root / "labels"
        self.state_dir = self.root / "state"
        self.history_dir = self.root / "history"
        self.locks_dir = self.root / "locks"
        for d in (self.labels_dir, self.state_dir, self.history_dir, self.locks_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.adapters_dir.mkdir(exist_ok=True)

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    def _labels_path(self, classifier: str) -> Path:
        return self.labels_dir / f"{check_classifier(classifier)}.jsonl"

    def append(
        self,
        labels: Sequence[ModeratorLabel],
        sources: Sequence[str | None] | None = None,
    ) -> int:
        """Durably append labels (fsynced on return); returns the number of lines written.

        `sources[i]` (e.g. "labels/3@1042") is kept with `labels[i]` for audit.
        """
        if sources is not None and len(sources) != len(labels):
            raise ValueError(f"{len(sources)} sources for {len(labels)} labels")
        groups: dict[str, list[tuple[ModeratorLabel, str | None]]] = {}
        for i, label in enumerate(labels):
            check_classifier(label.classifier)
            _check_label(label)
            groups.setdefault(label.classifier, []).append(
                (label, sources[i] if sources is not None else None)
            )
        base = self._seq_base()
        for classifier, items in groups.items():
            with _appending(self._labels_path(classifier)) as f:
                seq = max(self._last_seq_in(f, classifier), base.get(classifier, 0))
                received_at = _utc_now()
                out = bytearray()
                for label, source in items:
                    seq += 1
                    row = label.to_dict()
                    row["seq"] = seq
                    row["received_at"] = received_at
                    if source is not None:
                        row["source"] = source
                    out += orjson.dumps(row) + b"\n"
                f.write(out)
        return len(labels)

    def records(self, classifier: str) -> list[tuple[int, ModeratorLabel]]:
        """Every stored label as (seq, label), in file (arrival) order."""
        path = self._labels_path(classifier)
        out: list[tuple[int, ModeratorLabel]] = []
        for number, obj in _read_jsonl(path):
            try:
                out.append(_label_from(obj, classifier))
            except (TypeError, ValueError) as e:
                log.warning("%s: skipping invalid line %d: %s", path, number, e)
        return out

    def latest(self, classifier: str) -> list[tuple[int, ModeratorLabel]]:
        """One (seq, label) per comment id, the latest decision winning; sorted by seq."""
        best: dict[str, tuple[int, ModeratorLabel]] = {}
        for record in self.records(classifier):
            held = best.get(record[1].id)
            if held is None or _supersedes(record, held):
                best[record[1].id] = record
        return sorted(best.values(), key=lambda r: r[0])

    def classifiers(self) -> list[str]:
        """Classifiers with a labels file, sorted."""
        return sorted(
            p.stem for p in self.labels_dir.glob("*.jsonl") if CLASSIFIER_NAME.fullmatch(p.stem)
        )

    def count(self, classifier: str) -> int:
        """Number of valid stored label lines (duplicates included)."""
        return len(self.records(classifier))

    def last_seq(self, classifier: str) -> int:
        """The highest seq handed out for `classifier` (0 when none ever was)."""
        path = self._labels_path(classifier)
        base = self._seq_base().get(classifier, 0)
        try:
            with open(path, "rb") as f:
                return max(self._last_seq_in(f, classifier), base)
        except FileNotFoundError:
            return base

    def _last_seq_in(self, f: IO[bytes], classifier: str) -> int:
        """Seq of the last valid line, found from the end so appends stay cheap."""
        for line in _complete_lines(f, _torn_tail_start(f)):
            try:
                return _label_from(orjson.loads(line), classifier)[0]
            except (TypeError, ValueError):
                continue  # orjson.JSONDecodeError is a ValueError
        return 0

    def _seq_base(self) -> dict[str, int]:
        try:
            data = orjson.loads((self.labels_dir / _SEQ_BASE).read_bytes())
        except FileNotFoundError:
            return {}
        return {k: v for k, v in data.items() if type(v) is int} if isinstance(data, dict) else {}

    def reset_labels(self) -> Path:
        """Move `labels/` aside to `labels.<UTC timestamp>/` and start empty (topic rebuild).

        Seqs keep counting from where the old files stopped, so seqs saved in `state`
        (last cycle, last promotion) stay comparable. Run it while nothing else appends.
        """
        bases = {c: self.last_seq(c) for c in self.classifiers()}
        bases = {**self._seq_base(), **bases}
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = self.root / f"labels.{stamp}"
        n = 1
        while moved.exists():
            n += 1
            moved = self.root / f"labels.{stamp}-{n}"
        os.rename(self.labels_dir, moved)
        self.labels_dir.mkdir()
        if bases:
            _write_atomic(self.labels_dir / _SEQ_BASE, bases)
        _fsync_dir(self.root)
        return moved

    def state(self, classifier: str) -> dict[str, Any]:
        """The classifier's learner state ({} when never saved)."""
        path = self.state_dir / f"{check_classifier(classifier)}.json"
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except orjson.JSONDecodeError as e:
            # Written atomically, so this is outside damage: guessing {} could re-promote.
            raise ValueError(f"{path}: corrupt state: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: state is not a JSON object")
        return data

    def save_state(self, classifier: str, state: Mapping[str, Any]) -> None:
        """Replace the state atomically: a crash leaves the old or the new, never half."""
        _write_atomic(self.state_dir / f"{check_classifier(classifier)}.json", dict(state))

    def record_event(self, classifier: str, event: Mapping[str, Any]) -> None:
        """Append a cycle or promotion to the audit log (fsynced), stamped "at" if absent."""
        row = dict(event)
        row.setdefault("at", _utc_now())
        line = orjson.dumps(row) + b"\n"
        with _appending(self.history_dir / f"{check_classifier(classifier)}.jsonl") as f:
            f.write(line)

    def history(self, classifier: str) -> list[dict[str, Any]]:
        """The audit log, oldest first; non-object lines are skipped with a warning."""
        path = self.history_dir / f"{check_classifier(classifier)}.jsonl"
        out: list[dict[str, Any]] = []
        for number, obj in _read_jsonl(path):
            if isinstance(obj, dict):
                out.append(obj)
            else:
                log.warning("%s: skipping invalid line %d: not a JSON object", path, number)
        return out

    def training_lock(self, classifier: str) -> contextlib.AbstractContextManager[None]:
        """Hold the classifier's training lock for a `with` block, or raise `TrainingLocked`.

        Two learners must not train the same classifier at once: they would race on its
        adapters and state. flock locks belong to an open file description, so a second
        store object in the same process conflicts too; the kernel drops the lock when
        its holder dies, so a crashed learner never leaves a stale lock.
        """
        return _flock(self.locks_dir / f"{check_classifier(classifier)}.lock", classifier)


@contextlib.contextmanager
def _flock(path: Path, classifier: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            msg = f"classifier {classifier!r} is being trained by pid {holder}"
            raise TrainingLocked(msg) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a temp file beside `path`, fsync, rename over it, fsync the dir."""
    payload = orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
