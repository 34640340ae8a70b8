"""`moderation-worker bench --sections gpu` on the CPU with the tiny model: both dtypes get rows
with positive TFLOP/s, and the table says plainly that these are CPU figures.

No timing assertions: the numbers belong to BENCHMARKS-gpu.md, made on a GPU by
`scripts/gpu-bench.sh`.
"""

from __future__ import annotations

from pathlib import Path

import keras_hub
import pytest

from moderation_worker.model.sources import load_model_source
from moderation_worker.tools.bench import (
    GEMMA_2B_CONFIG,
    BenchEdges,
    BenchOptions,
    count_flops,
    dense_peak,
    gate_dim_reduction,
    run_bench,
)


def test_gpu_section_on_the_cpu_writes_both_dtypes_and_the_cpu_disclaimer(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS-gpu.md"
    options = BenchOptions.quick_defaults(
        sections=("gpu",), out=out, repeats=1, gpu_batches=(2,), matmul_sizes=(128,)
    )
    report = run_bench(options, BenchEdges(load_model=load_model_source))
    assert report.gpu is not None and not report.gpu.on_accelerator
    rows = report.gpu.rows
    assert {r.dtype for r in rows} == {"bfloat16", "float32"}
    assert {r.model for r in rows} == {"tiny-gemma3:0", "tiny Gemma (random weights)"}
    assert len(rows) == 2 * 2 and all(r.seconds and r.tflops > 0 for r in rows), rows
    text = out.read_text()
    assert "**CPU figures, not GPU figures**" in text
    table = [line for line in text.splitlines() if line.startswith("| tiny")]
    assert sum("| bfloat16 |" in line for line in table) == 2
    assert all("peak unknown" in line for line in table)  # no known card on a CPU


def test_gemma_2b_flops_use_the_halved_gate_width() -> None:
    config = keras_hub.models.GemmaBackbone(
        vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=64, head_dim=8,
    ).get_config()  # fmt: skip
    assert gate_dim_reduction(config) == 2  # KerasHub builds Gemma's gates 32 wide here
    as_saved = {**GEMMA_2B_CONFIG, "use_sliding_window_attention": False}  # a get_config() dict
    flops = count_flops(as_saved, sequence_length=128, n_labels=2)
    assert flops.per_token_layer["mlp"] == 3 * 2 * 2048 * 16_384
    # 2 FLOPs per weight per token, less the embedding (a lookup): ~2 x 1.98 B x 128 tokens
    assert flops.backbone == pytest.approx(2 * 1_981_882_368 * 128, rel=0.01)


@pytest.mark.parametrize(
    ("device", "dtype", "peak"),
    [
        ("NVIDIA H200", "bfloat16", 989.0),
        ("NVIDIA H100 80GB HBM3", "float32", 67.0),
        ("NVIDIA H100 PCIe", "bfloat16", 756.0),
        ("NVIDIA A100-SXM4-80GB", "float32", 19.5),
        ("NVIDIA L4", "bfloat16", 121.0),
        ("NVIDIA L40S", "bfloat16", None),
        ("NVIDIA H200 NVL", "bfloat16", None),
    ],
)
def test_dense_peaks_by_device_name(device: str, dtype: str, peak: float | None) -> None:
    assert dense_peak(device, dtype) == peak
