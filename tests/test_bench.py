"""`moderation-worker bench`: the command keeps working and the FLOP count stays right.

No timing assertions: speed lives in BENCHMARKS.md, never in a test's pass/fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moderation_worker.tools.bench import count_flops

GEMMA3_270M = {
    "hidden_dim": 640,
    "intermediate_dim": 2048,
    "num_layers": 18,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "vocabulary_size": 262_144,
}


def test_flops_of_gemma3_270m_by_hand() -> None:
    flops = count_flops(GEMMA3_270M, sequence_length=128, n_labels=2, prefix_tokens=24)
    # per token and layer: q,k,v 2*640*(1024+512) + o 2*1024*640 + attn 4*1024*128 + mlp 6*640*2048
    assert flops.backbone == 18 * 128 * (1_966_080 + 1_310_720 + 524_288 + 7_864_320)
    assert flops.full_vocab_head == 2 * 640 * 262_144 * 128
    assert flops.label_head == 2 * 640 * 2 + 2 * 128 * 640
    assert 2.5 < flops.full_vocab_path / flops.label_path < 2.7
    assert flops.prefix_share == pytest.approx(24 / 128 * flops.backbone / flops.label_path)


@pytest.mark.broker  # the pipeline section starts the embedded Tansu broker
def test_bench_quick_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "moderation_worker.cli", "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench " in proc.stderr and "wrote" in proc.stderr  # progress lines
    text = out.read_text()
    assert f"- Command: `moderation-worker bench --quick --out {out}`" in text
    for needed in (
        "- Date: ",
        "- Machine: ",
        "cores",
        "tensorflow ",
        "keras-hub ",
        "numpy ",
        "python ",
        "float32 square matmul",
        "## FLOP accounting",
        "| not measured: no GPU lent to this task |",
    ):
        assert needed in text, needed
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert any(r.startswith("| (a) codelab") and "| 1 |" in r for r in rows)
    for path in ("(b) batched full-vocab logits", "(c) batched last-position label head"):
        assert {r.split("|")[2].strip() for r in rows if path in r} == {"1", "8"}
    for knob in (
        "| XLA |",
        "| dtype |",
        "| length buckets |",
        "| threads |",
        "shared prompt prefix",
    ):
        assert knob in text, knob
    assert "| throughput (backlog) | trivial |" in text
    assert "Pipeline share of end-to-end time" in text
