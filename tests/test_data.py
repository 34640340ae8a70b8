"""ETHOS recipe and users' own CSV/JSONL files, with errors that name the row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moderation_worker.tools.data import (
    DataError,
    ethos_splits,
    load_ethos,
    load_labelled,
    load_labelled_file,
    load_splits,
    pandas_shuffle_order,
    parse_label,
)

ETHOS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ethos" / "Ethos_Dataset_Binary.csv"
)
needs_ethos = pytest.mark.skipif(not ETHOS.is_file(), reason="ETHOS not in ../shared/data")


@needs_ethos
def test_ethos_recipe_matches_the_codelab() -> None:
    data = load_ethos(ETHOS)
    assert len(data) == 998
    splits = ethos_splits(data, validation_rows=100)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (700, 100, 198)
    # pandas' sample(frac=1, random_state=32) order, checked once against pandas 2.x:
    order = pandas_shuffle_order(len(data), 32)
    assert order[:5].tolist() == np.random.RandomState(32).permutation(998)[:5].tolist()
    assert splits.test.texts[0] == data.texts[order[800]]
    assert set(splits.train.texts).isdisjoint(splits.test.texts[:50])
    assert 0.4 < splits.test.positive_rate < 0.7
    # median rule: isHate >= median is hateful
    assert data.labels.sum() == 515


@needs_ethos
def test_validation_rows_come_from_train_only() -> None:
    a = ethos_splits(load_ethos(ETHOS), validation_rows=0)
    b = ethos_splits(load_ethos(ETHOS), validation_rows=100)
    assert a.test.texts == b.test.texts
    assert a.train.texts[700:] == b.validation.texts


def test_ethos_bad_rows_name_the_row(tmp_path) -> None:
    bad = tmp_path / "Ethos_Dataset_Binary.csv"
    bad.write_text("comment;isHate\nfine;0.5\nbroken;lots\n")
    with pytest.raises(DataError, match="row 3"):
        load_ethos(bad)
    bad.write_text("text,label\n")
    with pytest.raises(DataError, match="header"):
        load_ethos(bad)


def test_csv_and_jsonl_loaders(tmp_path) -> None:
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text('text,label\n"hello, friend",0\nyou are awful,hateful\nok,true\n')
    texts, labels, ids = load_labelled_file(csv_file)
    assert texts == ("hello, friend", "you are awful", "ok") and labels.tolist() == [0, 1, 1]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"id": 7, "text": "a", "label": 1}\n\n{"text": "b", "label": "safe"}\n')
    data = load_labelled(jsonl)
    assert data.labels.tolist() == [1, 0] and data.sha256 and len(data) == 2
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"id": "x", "text": "a"}\n')
    assert load_labelled_file(unlabelled)[1] is None
    with pytest.raises(DataError, match="no 'label'"):
        load_labelled(unlabelled)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": "a", "label": 1}\n{"text": "", "label": 0}\n', "line 2: missing or empty"),
        ('{"text": "a", "label": 1}\nnot json\n', "line 2: invalid JSON"),
        ('{"text": "a", "label": 1}\n[1, 2]\n', "line 2: expected a JSON object"),
        ('{"text": "a", "label": 1}\n{"text": "b", "label": "maybe"}\n', "line 2: label"),
        ('{"text": "a", "label": 1}\n{"text": "b"}\n', "line 2: missing 'label'"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, content, match) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_labelled(path)


def test_own_data_gets_stratified_splits(tmp_path) -> None:
    path = tmp_path / "own.csv"
    rows = [f"text {i},{i % 2}" for i in range(100)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    splits = load_splits(path)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 100
    assert 0.3 < splits.validation.positive_rate < 0.7
    assert set(splits.train.texts).isdisjoint(splits.test.texts)


def test_parse_label_words() -> None:
    assert parse_label(True, "x") == 1 and parse_label("0.0", "x") == 0
    assert parse_label("Not Hateful", "x") == 0
    with pytest.raises(DataError):
        parse_label(2, "row 9")


def test_missing_file_is_clear() -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_labelled("/nonexistent/file.csv")
