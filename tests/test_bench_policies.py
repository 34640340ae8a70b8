"""`moderation-worker bench --sections policies`: per-row LoRA against swap-and-rerun with 1, 2
and 4 classifiers, on the tiny model in quick mode.

No timing assertions (speed lives in BENCHMARKS.md): the table has its rows with positive
rates, per-row scores equal each classifier alone, and the memory an extra classifier costs is
the size of its factors.
"""

from __future__ import annotations

import re

import pytest

from moderation_worker.model.sources import load_model_source
from moderation_worker.tools.bench import SECTIONS, BenchEdges, BenchOptions, run_bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    options = BenchOptions.quick_defaults(
        sections=("policies",), out=out, command="moderation-worker bench --quick"
    )
    report = run_bench(options, BenchEdges(load_model=load_model_source))
    return report, out.read_text(encoding="utf-8"), out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _number(cell: str) -> float:
    return float(cell.replace(",", "").replace("x", "").replace("%", "").strip())


def test_policies_is_a_section_and_a_quick_run_writes_only_its_file(quick_run) -> None:
    report, text, out = quick_run
    assert "policies" in SECTIONS
    assert out.is_file() and not out.with_name(out.name + ".partial").exists()
    assert "> `--quick` run" in text and "- Command: `moderation-worker bench --quick`" in text
    assert "## 6. Several classifiers: per-row LoRA vs swap-and-rerun" in text
    assert not report.scoring and not report.tuning and not report.pipeline  # only this one
    assert report.policies is not None and not report.policies.note, report.policies.note


def test_rows_for_1_2_4_classifiers_with_positive_rates_and_equal_scores(quick_run) -> None:
    _, text, _ = quick_run
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| Traffic | k |"))
    columns = _cells(lines[header])
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(columns, _cells(line), strict=True)))
    full = [r for r in rows if r["Traffic"] == "all k per comment"]
    assert [r["k"] for r in full] == ["1", "2", "4"]
    assert [r["Traffic"] for r in rows if r not in full] == ["mixed: 1 or 3 per comment"]
    for r in rows:
        rates = ("per-row comments/s", "per-row rows/s", "swap comments/s", "swap rows/s")
        for column in (*rates, "per-row / swap", "batch fill per-row", "batch fill swap"):
            assert _number(r[column]) > 0, (column, r)
        assert _number(r["max abs Δp vs alone"]) < 1e-4, r
    for r in full:
        assert int(r["rows"]) == int(r["k"]) * int(r["comments"])
        assert _number(r["batch fill per-row"]) == _number(r["batch fill swap"]) == 1.0
    (mixed,) = (r for r in rows if r not in full)
    assert int(mixed["rows"]) == 2 * int(mixed["comments"])  # half to 1, half to 3
    # Per-row packs a window's 16 rows into 2 full batches; swap runs 4 half batches.
    assert _number(mixed["batch fill per-row"]) == 1.0
    assert _number(mixed["batch fill swap"]) == 0.5
    assert "**Per-row LoRA against a single adapter** (k = 1, same rows)" in text


def test_memory_per_extra_classifier_is_the_size_of_its_factors(quick_run) -> None:
    report, text, _ = quick_run
    policies = report.policies
    assert len(policies.adapters) == 4
    sizes = {
        name: sum(a.nbytes + b.nbytes for a, b in adapter.factors.values())
        for name, adapter in policies.adapters.items()
    }
    assert len(set(sizes.values())) == 1  # same rank and layers: one slot's worth each
    (factor_bytes,) = set(sizes.values())
    assert factor_bytes > 0 and policies.bytes_per_slot == factor_bytes
    row = next(line for line in text.splitlines() if "LoRA factors per extra classifier" in line)
    assert re.search(rf"\| {factor_bytes:,} B \(", row), row
    backbone = next(line for line in text.splitlines() if "backbone parameters" in line)
    assert int(re.search(r"\| ([\d,]+) B", backbone).group(1).replace(",", "")) > factor_bytes
    assert "RSS growth building the set of 1" in text and "RSS growth building the set of 4" in text
