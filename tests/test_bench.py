"""`moderation-worker bench`: the command keeps working, the FLOP count stays right, a quick run
never touches BENCHMARKS.md, and the report names the accelerator the run actually used.

No timing assertions: speed lives in BENCHMARKS.md, never in a test's pass/fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import keras
import pytest

from moderation_worker.cli import build_parser
from moderation_worker.tools.bench import (
    Accelerator,
    BenchOptions,
    BenchReport,
    count_flops,
    detect_accelerator,
    machine_info,
    render,
)
from moderation_worker.tools.bench import machine as bench_machine

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
        timeout=900,
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
        f"- Accelerator: {detect_accelerator().describe()}; "
        f"Keras backend: {keras.backend.backend()}",
    ):
        assert needed in text, needed
    rows = [line for line in text.splitlines() if line.startswith("| (")]
    assert any(r.startswith("| (a) codelab") and "| 1 |" in r for r in rows)
    for path in ("(b) batched full-vocab logits", "(c) batched last-position label head"):
        assert {r.split("|")[2].strip() for r in rows if path in r} == {"1", "8"}
    for knob in (
        "| XLA |",
        "| dtype |",
        "| threads |",
        "shared prompt prefix",
        "## 2. Length-aware batching and the prefix cache",
        "| before: arrival-order batches, cut to their longest prompt |",
        "| + length queues + prefix cache |",
        "tweet-length (cut to 280 chars)",
        "scorer alone: the worker's core batching in-process",
    ):
        assert knob in text, knob
    assert "| throughput (backlog) | trivial |" in text
    assert "Pipeline share of end-to-end time" in text


# ---------------------------------------------------------------------------------------------
# A quick run never overwrites the real table
# ---------------------------------------------------------------------------------------------


def test_quick_options_write_a_temporary_file_unless_out_is_given(tmp_path: Path) -> None:
    quick = BenchOptions.quick_defaults()
    folder = quick.out.parent
    assert quick.out.name == "BENCHMARKS.md" and folder.resolve() != Path.cwd().resolve()
    assert folder.is_dir() and folder.name.startswith("moderation-worker-bench-")
    folder.rmdir()
    assert BenchOptions.quick_defaults(out=tmp_path / "x.md").out == tmp_path / "x.md"
    assert BenchOptions().out == Path("BENCHMARKS.md"), "a full run still refreshes the table"
    assert build_parser().parse_args(["bench", "--quick"]).out is None


def test_quick_run_without_out_leaves_benchmarks_md_untouched(tmp_path: Path) -> None:
    """The CLI end to end, in a folder holding a BENCHMARKS.md as the repository does."""
    table = tmp_path / "BENCHMARKS.md"
    table.write_text("the real table\n")
    before = table.stat().st_mtime_ns
    temp = tmp_path / "tmp"
    temp.mkdir()
    command = ["-m", "moderation_worker.cli", "bench", "--quick", "--sections", "scoring"]
    proc = subprocess.run(
        [sys.executable, *command],
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(temp)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table.read_text() == "the real table\n" and table.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md", "tmp"]  # no .partial
    (written,) = temp.glob("moderation-worker-bench-*/BENCHMARKS.md")
    assert f"wrote {written} in" in proc.stderr
    text = written.read_text()
    assert "`--quick` run" in text and "- Command: `moderation-worker bench --quick" in text
    assert "| (c) batched last-position label head | 8 |" in text


# ---------------------------------------------------------------------------------------------
# The accelerator and backend the run used
# ---------------------------------------------------------------------------------------------


def _report(machine: dict) -> str:
    options = BenchOptions(sections=(), command="moderation-worker bench")
    return render(BenchReport(options, "today", machine, {"python": "3"}, load_before=""))


def _accelerator_line(text: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("- Accelerator: ")]
    return line


def test_report_names_the_detected_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = Accelerator("jax", "GPU", ("NVIDIA H200",), cpu="AMD EPYC")
    monkeypatch.setattr(bench_machine, "detect_accelerator", lambda: gpu)
    text = _report(machine_info())
    assert _accelerator_line(text) == "- Accelerator: NVIDIA H200 (GPU, jax); Keras backend: jax"
    assert "ran on NVIDIA H200 (GPU, jax)" in text and "found no GPU" not in text


def test_report_says_cpu_only_when_no_accelerator_was_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = Accelerator("tensorflow", cpu="Some CPU 9000")
    monkeypatch.setattr(bench_machine, "detect_accelerator", lambda: cpu)
    text = _report(machine_info())
    assert _accelerator_line(text) == (
        "- Accelerator: none (tensorflow sees no GPU); ran on the CPU: Some CPU 9000; "
        "Keras backend: tensorflow"
    )
    assert "| not measured: tensorflow found no GPU on this machine |" in text


def test_detection_asks_the_active_backend_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each backend's own device list; the other frameworks are never imported (a `None` entry
    in sys.modules makes importing them fail, which would show as a note)."""
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu")
    monkeypatch.setitem(sys.modules, "jax", types.SimpleNamespace(devices=lambda: [gpu, gpu]))
    monkeypatch.setitem(sys.modules, "torch", None)
    jax = detect_accelerator("jax")
    assert (jax.kind, jax.devices, jax.note) == ("GPU", ("NVIDIA H200", "NVIDIA H200"), "")
    assert jax.describe() == "2 x NVIDIA H200 (GPU, jax)"

    cuda = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1, get_device_name=lambda i: "NVIDIA L4"
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setitem(sys.modules, "jax", None)
    assert detect_accelerator("torch").devices == ("NVIDIA L4",)

    monkeypatch.setitem(sys.modules, "jax", types.SimpleNamespace(devices=lambda: [cpu]))
    on_cpu = detect_accelerator("jax")
    assert not on_cpu.found and on_cpu.kind == "CPU" and on_cpu.cpu == bench_machine.cpu_model()


def test_tensorflow_gpus_are_named_by_their_device_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tensorflow as tf

    device = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    listed = {"GPU": [device], "TPU": []}
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: listed[kind])
    monkeypatch.setattr(
        tf.config.experimental, "get_device_details", lambda d: {"device_name": "NVIDIA H200"}
    )
    assert detect_accelerator("tensorflow").describe() == "NVIDIA H200 (GPU, tensorflow)"


def test_a_failing_device_query_is_noted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list:
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setitem(sys.modules, "jax", types.SimpleNamespace(devices=broken))
    found = detect_accelerator("jax")
    assert not found.found and "CUDA driver version is insufficient" in found.note
    assert found.describe().startswith("none (jax sees no GPU; device query failed:")
    assert detect_accelerator("numpy").describe().startswith("none (numpy sees no GPU)")
    # and on this machine, the real backend answers without raising
    assert detect_accelerator().backend == keras.backend.backend()
