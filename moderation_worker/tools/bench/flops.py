"""FLOP accounting per scoring path, and the bound it is set against: this machine's measured
matmul peak through `keras.ops`, timed with the one timer every section uses."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moderation_worker.tools.bench.options import log

# ---------------------------------------------------------------------------------------------
# FLOP accounting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per comment (a multiply-add counts 2) of each scoring path at one sequence length.

    Counted: the q/k/v/o projections, attention scores and the attention-weighted sum over all
    `T` key positions (the dense T x T the kernels compute; causal masking would halve it),
    the gated MLP's three matrices, and the output projection. Not counted: norms, RoPE,
    softmax, embedding lookup: O(T * d) element-wise work, under 0.1 % here.
    """

    sequence_length: int
    per_token_layer: dict[str, float]
    backbone: float
    full_vocab_head: float
    label_head: float
    prefix_tokens: int = 0

    @property
    def full_vocab_path(self) -> float:
        """Paths (a) and (b): backbone plus vocabulary logits at every position."""
        return self.backbone + self.full_vocab_head

    @property
    def label_path(self) -> float:
        """Path (c): backbone plus the label logits at the last real position."""
        return self.backbone + self.label_head

    @property
    def prefix_share(self) -> float:
        """Share of path (c)'s FLOPs a cached shared prompt head would skip (its rows' work)."""
        return self.prefix_tokens / self.sequence_length * self.backbone / self.label_path


def count_flops(
    config: dict[str, Any], sequence_length: int, n_labels: int, prefix_tokens: int = 0
) -> FlopCount:
    """Count FLOPs per comment from a Gemma/Gemma 3 backbone config (`backbone.get_config()`).

    With d = hidden_dim, F = intermediate_dim, L = num_layers, Hq/Hkv query/key-value heads
    of size h, V = vocabulary_size, T = sequence_length, per token and layer:
    projections 2d(Hq h + 2 Hkv h) + 2 Hq h d, attention 4 Hq h T, MLP 6 d F; backbone
    L T (those); output head 2 d V T for full logits, 2 d n_labels + 2 T d for the label head.
    F is the gate's real width: `intermediate_dim / gate_dim_reduction(config)`.
    """
    d = float(config["hidden_dim"])
    ffn = float(config["intermediate_dim"]) / gate_dim_reduction(config)
    layers = int(config["num_layers"])
    hq = float(config["num_query_heads"])
    hkv = float(config["num_key_value_heads"])
    h = float(config["head_dim"])
    vocab = float(config["vocabulary_size"])
    t = float(sequence_length)
    per = {
        "qkv_projection": 2 * d * (hq * h + 2 * hkv * h),
        "output_projection": 2 * hq * h * d,
        "attention": 4 * hq * h * t,
        "mlp": 3 * 2 * d * ffn,
    }
    backbone = layers * t * sum(per.values())
    return FlopCount(
        sequence_length=sequence_length,
        per_token_layer=per,
        backbone=backbone,
        full_vocab_head=2 * d * vocab * t,
        label_head=2 * d * n_labels + 2 * t * d,
        prefix_tokens=prefix_tokens,
    )


def gate_dim_reduction(config: dict[str, Any]) -> int:
    """How much narrower the MLP gate is than `intermediate_dim` says: 2 for Gemma and Gemma 2.

    KerasHub's Gemma/Gemma 2 blocks build their gates `intermediate_dim // 2` wide (gemma_2b:
    32768 -> 16384, which the preset's 2,506,172,416 parameters confirm); Gemma 3's blocks use
    `intermediate_dim` as is. A `GemmaBackbone` config has `use_sliding_window_attention` but
    no `use_query_key_norm`; a hand-written dict says it with `gate_dim_reduction` or means 1.
    """
    if "gate_dim_reduction" in config:
        return int(config["gate_dim_reduction"])
    gemma_v1_v2 = "use_sliding_window_attention" in config and "use_query_key_norm" not in config
    return 2 if gemma_v1_v2 else 1


# ---------------------------------------------------------------------------------------------
# Timing and the machine's peak
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of `fn` after `warmup` untimed ones (compilation, caches)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def matmul_peak(sizes: Sequence[int], repeats: int = 5) -> dict[str, Any]:
    """Best GFLOP/s of square float32 matmuls through `keras.ops` (the backend's BLAS/oneDNN).

    Best, not median: the peak is what the hardware and library can do, and the other
    engineers' jobs on a shared machine only ever make it look lower.
    """
    import keras
    from keras import ops

    best: dict[str, Any] = {"gflops": 0.0, "size": None}
    rng = np.random.default_rng(0)
    for n in sizes:
        a = ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))
        b = ops.convert_to_tensor(rng.standard_normal((n, n), dtype=np.float32))

        def run(a=a, b=b) -> None:
            keras.ops.convert_to_numpy(ops.sum(ops.matmul(a, b)))

        seconds = min(timed(run, repeats))
        gflops = 2.0 * n**3 / seconds / 1e9
        log(f"matmul {n}x{n}: {gflops:.1f} GFLOP/s")
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "size": n}
    return best


def shaped_matmul(m: int, k: int, n: int, repeats: int = 5) -> float:
    """GFLOP/s of one model-shaped matmul (e.g. the MLP's [B*T, d] x [d, F])."""
    from keras import ops

    rng = np.random.default_rng(1)
    a = ops.convert_to_tensor(rng.standard_normal((m, k), dtype=np.float32))
    b = ops.convert_to_tensor(rng.standard_normal((k, n), dtype=np.float32))
    seconds = min(timed(lambda: ops.convert_to_numpy(ops.sum(ops.matmul(a, b))), repeats))
    return 2.0 * m * k * n / seconds / 1e9


def memory_available_bytes() -> int | None:
    """`MemAvailable` from /proc/meminfo (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
