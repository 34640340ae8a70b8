"""`bench --sections peer`: llama.cpp beside our scorer on the same GGUF and prompt token ids.

Without llama-cpp-python the row is one clear skip line and the run goes on; with it, on the
real Gemma 3 270M, llama.cpp's probabilities agree with ours within quantization noise.
No timing assertions: speed lives in BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from moderation_worker.model.sources import load_model_source
from moderation_worker.tools.bench import (
    SKIP_NOT_INSTALLED,
    BenchEdges,
    BenchOptions,
    measure_peer,
    run_bench,
)
from moderation_worker.tools.bench.peer import load_llama_cpp

# ETHOS-like comments: two clearly hateful, two clearly not (the file itself may be absent).
TEXTS = [
    "Thank you so much for helping my grandmother cross the street, that was very kind.",
    "All immigrants are vermin and should be driven out of this country by force.",
    "I watched the match last night and the second half was really exciting.",
    "Women are too stupid to vote, they should stay in the kitchen where they belong.",
]


def test_without_llama_cpp_the_row_is_a_skip_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    assert load_llama_cpp() is None
    model = load_model_source("tiny")
    assert measure_peer(model, tmp_path / "x.gguf", TEXTS, 2, ()).skipped == SKIP_NOT_INSTALLED
    out = tmp_path / "BENCHMARKS.md"
    options = BenchOptions.quick_defaults(sections=("peer",), out=out, matmul_sizes=(128,))
    report = run_bench(options, BenchEdges(load_model=load_model_source))
    assert report.peer is not None and report.peer.rows == []
    text = out.read_text()
    assert "## llama.cpp peer" in text
    assert "skipped: llama-cpp-python not installed (`pip install -e '.[peer]'`)" in text


@pytest.mark.gemma270m
def test_llama_cpp_agrees_with_our_scorer_on_the_real_gemma3_270m() -> None:
    if load_llama_cpp() is None:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[peer]')")
    from moderation_worker.model.gguf_gemma3 import gguf_path

    model = load_model_source("gemma3-270m")
    report = measure_peer(model, gguf_path(), TEXTS, batch_size=2, buckets=())
    assert not report.skipped and report.ours is not None
    assert [r.path.split(": ", 1)[1] for r in report.rows] == [
        f"one prompt per call, {report.threads} threads",
        f"2 prompts packed, {report.threads} threads",
    ]
    for row in report.rows:
        assert np.isfinite(row.comments_per_s) and row.comments_per_s > 0, row
        # Measured on the 198 ETHOS test comments (llama.cpp 0.3.36, AVX-512, 2 threads): |Δp|
        # vs ours median 0.020 and max 0.107 one prompt per call, 0.014 and 0.094 packed; 97.5
        # and 98.5 % of decisions at 0.5 agree. llama.cpp multiplies the q4_K/q6_K weights
        # with activations rounded to 8 bits and keeps K/V in float16; ours dequantizes the
        # same weights to float32 and stays there, so only rounding separates them (its own
        # two modes differ as much: a row's rounding depends on the batch it runs in). 0.15
        # leaves a margin for other CPUs' kernels and stays well under the 0.26 that separates
        # the closest kind and hateful texts here in ours (p 0.13, 0.35 kind; 0.61, 0.78).
        assert row.max_dp is not None and row.max_dp < 0.15, row
        assert row.agree is not None and row.agree >= 0.75, row  # at most 1 of 4 flips at 0.5
