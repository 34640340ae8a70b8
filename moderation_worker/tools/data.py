"""Labelled text data: the ETHOS recipe of the method, and users' own CSV / JSONL files.

ETHOS follows the codelab exactly (hateful when `isHate >= median`, pandas-style shuffle with
seed 32, the first 800 rows train, the rest test); the validation split for threshold
calibration is carved from the *end* of the train part, so the test split stays untouched.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ETHOS_URL = (
    "https://raw.githubusercontent.com/intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset/"
    "master/ethos/ethos_data/Ethos_Dataset_Binary.csv"
)
ETHOS_SEED = 32
ETHOS_TRAIN_ROWS = 800

TRUE_WORDS = {"1", "true", "yes", "hateful", "hate", "toxic", "positive"}
FALSE_WORDS = {"0", "false", "no", "not hateful", "safe", "clean", "negative", "none"}
#: Words that generated comments are drawn from, when no real data is at hand (benchmarks):
#: chat about sport and recipes, with an insult in the mix.
FILLER_WORDS = tuple(
    (
        "the match last night was great and the referee made a few calls I disagree with "
        "thanks for sharing this recipe I will try it tomorrow with my family "
        "you are an idiot and people like you are trash "
        "honestly this thread is going nowhere but the original post had a point"
    ).split()
)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with binary labels (1 = hateful) and where they came from."""

    texts: tuple[str, ...]
    labels: np.ndarray  # int64 [n], 0/1
    source: str = ""
    sha256: str | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: Sequence[int] | slice) -> LabelledTexts:
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        return LabelledTexts(
            tuple(self.texts[i] for i in idx), self.labels[idx], self.source, self.sha256
        )

    @property
    def positive_rate(self) -> float:
        return float(self.labels.mean()) if len(self) else 0.0


@dataclass(frozen=True)
class Splits:
    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts


def _read_bytes(path_or_url: str | Path) -> bytes:
    text = str(path_or_url)
    if text.startswith(("http://", "https://")):
        with urllib.request.urlopen(text, timeout=60) as response:  # noqa: S310 - fixed URL
            return response.read()
    path = Path(text)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return path.read_bytes()


def load_ethos(path_or_url: str | Path = ETHOS_URL) -> LabelledTexts:
    """ETHOS binary in file order, labelled with the codelab's median rule."""
    raw = _read_bytes(path_or_url)
    reader = csv.reader(io.StringIO(raw.decode("utf-8")), delimiter=";")
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["comment", "isHate"]:
        raise DataError(f"{path_or_url}: expected an ETHOS header 'comment;isHate', got {header}")
    texts, scores = [], []
    for row_no, row in enumerate(reader, start=2):
        if len(row) != 2:
            raise DataError(f"{path_or_url} row {row_no}: expected 2 fields, got {len(row)}")
        try:
            scores.append(float(row[1]))
        except ValueError:
            raise DataError(
                f"{path_or_url} row {row_no}: isHate {row[1]!r} is not a number"
            ) from None
        texts.append(row[0])
    score = np.asarray(scores)
    labels = (score >= np.median(score)).astype(np.int64)
    return LabelledTexts(tuple(texts), labels, str(path_or_url), hashlib.sha256(raw).hexdigest())


#: The ETHOS multi-label file's categories; `directed` is short for `directed_vs_generalized`.
ETHOS_CATEGORIES = (
    "violence",
    "directed_vs_generalized",
    "gender",
    "race",
    "national_origin",
    "disability",
    "religion",
    "sexual_orientation",
)
ETHOS_CATEGORY_ALIASES = {"directed": "directed_vs_generalized"}


def _comparable(text: str) -> str:
    """Letters and digits only, lower-cased: the two ETHOS files differ in spaces and quotes."""
    return re.sub(r"\W+", "", text.lower())


def load_ethos_category(multi_path: str | Path, category: str) -> LabelledTexts:
    """One ETHOS multi-label category as a binary task over the *binary* file, in its order.

    The multi-label file holds only the hateful comments; the binary file's other comments are
    negatives for every category. A comment is positive when its category score is >= 0.5.
    The binary file (`Ethos_Dataset_Binary.csv`) must sit beside the multi-label one. Keeping
    the binary file's order means `ethos_splits` gives every classifier the same test comments
    as the hate classifier, so no classifier of the platform was tuned on another's test rows.
    """
    category = ETHOS_CATEGORY_ALIASES.get(category, category)
    if category not in ETHOS_CATEGORIES:
        raise DataError(
            f"unknown ETHOS category {category!r}; one of {', '.join(ETHOS_CATEGORIES)}"
        )
    multi_path = Path(multi_path)
    binary = load_ethos(multi_path.with_name("Ethos_Dataset_Binary.csv"))
    raw = _read_bytes(multi_path)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")), delimiter=";")
    if reader.fieldnames is None or category not in reader.fieldnames:
        raise DataError(f"{multi_path}: no column {category!r} (header {reader.fieldnames})")
    scores: dict[str, float] = {}
    for row_no, row in enumerate(reader, start=2):
        try:
            scores[_comparable(row["comment"])] = float(row[category])
        except (TypeError, ValueError):
            raise DataError(f"{multi_path} row {row_no}: {category} is not a number") from None
    labels = np.zeros(len(binary), dtype=np.int64)
    matched = 0
    for i, (text, hateful) in enumerate(zip(binary.texts, binary.labels, strict=True)):
        score = scores.get(_comparable(text))
        if score is not None and hateful:
            labels[i] = int(score >= 0.5)
            matched += 1
    if matched != len(scores):
        raise DataError(
            f"{multi_path}: {len(scores) - matched} of {len(scores)} comments are not hateful "
            "comments of the binary file beside it"
        )
    digest = hashlib.sha256(raw + bytes.fromhex(binary.sha256 or "")).hexdigest()
    return LabelledTexts(binary.texts, labels, f"{multi_path}#{category}", digest)


def balanced_subset(data: LabelledTexts, negatives_per_positive: float, seed: int) -> LabelledTexts:
    """Every positive and at most `negatives_per_positive` times as many negatives, shuffled.

    A rare category (14 % positives) trains on more positives per step this way; the threshold
    is calibrated afterwards on the untouched validation split, which restores the real base rate.
    """
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(data.labels == 1)
    neg = np.flatnonzero(data.labels == 0)
    keep = min(len(neg), int(round(negatives_per_positive * len(pos))))
    chosen = np.concatenate([pos, rng.choice(neg, size=keep, replace=False)])
    return data.take(rng.permutation(chosen))


def pandas_shuffle_order(n: int, seed: int) -> np.ndarray:
    """The row order of `DataFrame.sample(frac=1, random_state=seed)`, without pandas.

    pandas draws `RandomState(seed).choice(n, size=n, replace=False)`, which is a permutation.
    """
    return np.random.RandomState(seed).choice(n, size=n, replace=False)


def ethos_splits(
    data: LabelledTexts, validation_rows: int = 100, train_rows: int = ETHOS_TRAIN_ROWS
) -> Splits:
    """The codelab's split (shuffle seed 32, first 800 train, rest test), plus validation.

    Validation is the last `validation_rows` of the 800 training rows, so the fit uses
    `800 - validation_rows` examples and the test split is exactly the codelab's.
    """
    if not 0 <= validation_rows < train_rows:
        raise ValueError(f"validation_rows must be in [0, {train_rows}), got {validation_rows}")
    order = pandas_shuffle_order(len(data), ETHOS_SEED)
    shuffled = data.take(order)
    fit_end = train_rows - validation_rows
    return Splits(
        train=shuffled.take(slice(0, fit_end)),
        validation=shuffled.take(slice(fit_end, train_rows)),
        test=shuffled.take(slice(train_rows, None)),
    )


def parse_label(value: Any, where: str) -> int:
    """0/1 from ints, bools, floats 0.0/1.0 or words (`hateful`, `safe`, `true`, ...)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return 1
        if word in FALSE_WORDS:
            return 0
        try:
            number = float(word)
        except ValueError:
            number = None
        if number in (0.0, 1.0):
            return int(number)
    raise DataError(f"{where}: label {value!r} is not 0/1, true/false or hateful/safe")


def _records(path: Path, raw: bytes) -> Iterable[tuple[str, dict[str, Any]]]:
    text = raw.decode("utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object")
            yield where, obj
    else:
        sample = text[:4096]
        delimiter = ";" if sample.count(";") > sample.count(",") else ","
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        for row_no, row in enumerate(reader, start=2):
            yield f"{path} row {row_no}", row


def load_labelled_file(
    path: str | Path, text_field: str = "text", label_field: str | None = "label"
) -> tuple[tuple[str, ...], np.ndarray | None, tuple[str | None, ...]]:
    """Read texts, optional labels and optional ids from CSV or JSONL.

    Returns `(texts, labels or None, ids)`. Labels are required on every row if any row has
    them. Every bad row raises `DataError` naming the file and row.
    """
    path = Path(path)
    raw = _read_bytes(path)
    texts: list[str] = []
    labels: list[int] = []
    ids: list[str | None] = []
    for where, record in _records(path, raw):
        value = record.get(text_field)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: missing or empty {text_field!r}")
        texts.append(value)
        rid = record.get("id")
        ids.append(None if rid in (None, "") else str(rid))
        label = record.get(label_field) if label_field else None
        if label not in (None, ""):
            labels.append(parse_label(label, where))
        elif labels:
            raise DataError(f"{where}: missing {label_field!r} while earlier rows have one")
    if not texts:
        raise DataError(f"{path}: no rows")
    if labels and len(labels) != len(texts):
        raise DataError(f"{path}: only {len(labels)} of {len(texts)} rows have a label")
    return tuple(texts), (np.asarray(labels, dtype=np.int64) if labels else None), tuple(ids)


def load_labelled(
    path: str | Path, text_field: str = "text", label_field: str = "label"
) -> LabelledTexts:
    """A labelled CSV/JSONL as `LabelledTexts`; every row must have a label."""
    texts, labels, _ = load_labelled_file(path, text_field, label_field)
    if labels is None:
        raise DataError(f"{path}: no {label_field!r} column; training and evaluation need labels")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return LabelledTexts(texts, labels, str(path), digest)


def stratified_split(
    data: LabelledTexts,
    validation_fraction: float = 0.125,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Splits:
    """Train/validation/test for users' own data, stratified by label, reproducible by seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(data))
    rest, test = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=data.labels
    )
    val_share = validation_fraction / (1 - test_fraction)
    train, val = train_test_split(
        rest, test_size=val_share, random_state=seed, stratify=data.labels[rest]
    )
    return Splits(data.take(train), data.take(val), data.take(test))


def load_splits(source: str | Path, validation_rows: int = 100, seed: int = 0) -> Splits:
    """ETHOS (`ethos`, `ethos:PATH` or a file named like ETHOS) or a user's labelled file."""
    text = str(source)
    if text.startswith("ethos-multi:"):
        category, _, path = text.split(":", 1)[1].partition(":")
        if not path:
            raise DataError(
                "ethos-multi needs a file: 'ethos-multi:CATEGORY:PATH_TO_MULTI_LABEL_CSV'"
            )
        return ethos_splits(load_ethos_category(path, category), validation_rows)
    if text == "ethos":
        return ethos_splits(load_ethos(), validation_rows)
    if text.startswith("ethos:"):
        return ethos_splits(load_ethos(text.split(":", 1)[1]), validation_rows)
    if Path(text).name.lower().startswith("ethos_dataset_binary"):
        return ethos_splits(load_ethos(text), validation_rows)
    return stratified_split(load_labelled(text), seed=seed)
