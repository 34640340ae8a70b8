"""Cost per million comments and the breakpoint against a hosted API: the arithmetic, and that
every price must come from the input file with its date."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from moderation_worker.tools.cost import (
    Measured,
    Prices,
    breakpoint_per_day,
    build_rows,
    per_million,
    render,
    self_cost_per_day,
)

PRICES = """
taken_on = "2026-12-02"
source = "test prices"
currency = "EUR"
[machines.this-cpu]
per_hour = 0.10
[machines.gpu]
per_hour = 3.0
peak_tflops = 1000.0
[api.hosted]
per_1k_calls = 1.0
"""


def prices(tmp_path: Path, text: str = PRICES) -> Prices:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    return Prices.load(path)


def test_cost_per_million_and_the_breakpoint() -> None:
    # 10 comments/s at 0.36/hour: 36,000 comments per hour -> 10 per million
    assert per_million(0.36, 10.0) == pytest.approx(10.0)
    # one machine a day costs 2.4; the API 0.001 per call: cheaper from 2,400 comments/day
    assert breakpoint_per_day(0.10, 10.0, 0.001, headroom=0.5) == pytest.approx(2400.0)
    # a machine whose whole day of capacity is cheaper through the API never pays off
    assert math.isinf(breakpoint_per_day(100.0, 0.01, 0.001, headroom=0.5))
    # more traffic than one machine carries at 50 % headroom needs two
    assert self_cost_per_day(432_001, 0.10, 10.0, 0.5) == pytest.approx(4.8)
    assert self_cost_per_day(10, 0.10, 10.0, 0.5) == pytest.approx(2.4)


def test_rows_measured_here_and_derived_for_the_gpu(tmp_path: Path) -> None:
    p = prices(tmp_path)
    m = Measured("gemma", 12.0, 1_000_000, 1_000, flops_per_comment=1e11, train_seconds=60.0)
    rows = build_rows([m], p, utilisation=0.3, headroom=0.5, local="this-cpu")
    here, gpu = rows
    assert here["how"] == "measured" and here["comments_per_s"] == 12.0
    assert gpu["comments_per_s"] == pytest.approx(1000e12 * 0.3 / 1e11)
    assert gpu["how"].startswith("derived")
    text = render(rows, [m], p, 0.5, "moderation-worker cost …")
    assert "test prices, taken 2026-12-02 (EUR)" in text and "derived" in text


@pytest.mark.parametrize(
    "text",
    [
        PRICES.replace('taken_on = "2026-12-02"\n', ""),
        PRICES.replace('source = "test prices"\n', ""),
        PRICES.replace("per_hour = 0.10", "per_hour = -1"),
    ],
)
def test_prices_without_a_date_a_source_or_a_positive_price_are_refused(
    tmp_path: Path, text: str
) -> None:
    with pytest.raises(ValueError):
        prices(tmp_path, text)


def test_per_label_metrics_and_entry_expansion() -> None:
    import numpy as np

    from moderation_worker.tools.per_label import expand, metrics_at

    y = np.array([1, 1, 0, 0, 1])
    p = np.array([0.9, 0.4, 0.6, 0.1, 0.8])
    m = metrics_at(y, p, 0.5)  # tp 2, fp 1, fn 1
    assert (m["precision"], m["recall"], m["support"]) == (2 / 3, 2 / 3, 3)
    assert m["f1"] == pytest.approx(2 / 3)
    rows = expand(["enc={category}=encoder:runs/e-{category}", "g=race=gemma3-270m@x"],
                  ("race", "gender"))  # fmt: skip
    assert rows == [
        ("enc", "race", "encoder:runs/e-race"),
        ("enc", "gender", "encoder:runs/e-gender"),
        ("g", "race", "gemma3-270m@x"),
    ]
