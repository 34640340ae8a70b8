"""A converted backbone as one flat file of arrays, memory-mapped and loaded in one pass.

Why: a worker replica on a machine that already converted the model should be ready in
seconds. Keras' own `.weights.h5` path costs three passes over the 1 GB of Gemma 3 270M
weights (zero-filled variables, an h5py read per variable, an assign per variable) and
measured ~10 s of a ~20 s cold start (BENCHMARKS.md, "Cold start"). Here:

- `save_flat(backbone, folder, extra)` writes `weights.bin` (every variable's raw bytes,
  64-byte aligned, in `backbone.weights` order), `weights.json` (path, shape, dtype and
  offset of each), the backbone's `config.json` and any extra files (the tokenizer), into a
  temporary folder renamed into place, so a folder that exists is complete.
- `load_flat(folder, backbone_class)` memory-maps `weights.bin` (copy-on-write: pages are
  shared with the page cache and with other replicas on the machine, and a write never reaches
  the file), builds the backbone with *deferred* variables (`keras.StatelessScope`), then
  creates each variable straight from its mapped array: one copy, no random or zero fill.

Exact: the values are the bytes that were saved (tests compare probabilities bit for bit).
The deferred-initialisation step uses two Keras internals (a variable's `_initializer` and
`initialize_all_variables`); if they ever change, the loader builds the plain way and assigns
instead (logged), so a Keras upgrade costs speed, never correctness.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

log = logging.getLogger("moderation_worker.model")

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.bin"
INDEX_FILE = "weights.json"
CONFIG_FILE = "config.json"
_ALIGN = 64


@dataclass(frozen=True)
class FlatLoad:
    """What `load_flat` did, for the cold-start log: how long each part took."""

    map_s: float  # read the index and config, memory-map the file
    build_s: float  # build the backbone, its variables created from the mapped arrays
    nbytes: int
    one_pass: bool


def _numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def save_flat(backbone: keras.Model, folder: Path, extra: Mapping[str, bytes] = ()) -> Path:
    """Write `backbone` (config and weights) and `extra` files into `folder`, atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        entries, offset = [], 0
        with open(tmp / WEIGHTS_FILE, "wb") as fh:
            for variable in backbone.weights:
                array = np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value))
                array = array.astype(_numpy_dtype(variable.dtype), copy=False)
                pad = -offset % _ALIGN
                fh.write(b"\0" * pad)
                offset += pad
                fh.write(array.tobytes())
                entries.append(
                    {
                        "path": variable.path,
                        "shape": list(array.shape),
                        "dtype": variable.dtype,
                        "offset": offset,
                    }
                )
                offset += array.nbytes
        index = {"format": FORMAT_VERSION, "nbytes": offset, "variables": entries}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
        (tmp / CONFIG_FILE).write_text(json.dumps(backbone.get_config(), indent=1))
        for name, data in dict(extra).items():
            (tmp / name).write_bytes(data)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
        if folder.exists():  # a stale copy, or another process won the race
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / INDEX_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_complete(folder: Path) -> bool:
    """A flat cache folder that `save_flat` finished (it is renamed into place when done)."""
    folder = Path(folder)
    return all((folder / name).is_file() for name in (WEIGHTS_FILE, INDEX_FILE, CONFIG_FILE))


def read_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Variable path -> its array, memory-mapped copy-on-write (nothing is read yet)."""
    folder = Path(folder)
    index = json.loads((folder / INDEX_FILE).read_text())
    if index.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder}: flat weights format {index.get('format')!r}, not 1")
    size = (folder / WEIGHTS_FILE).stat().st_size
    if size != index["nbytes"]:
        raise ValueError(f"{folder / WEIGHTS_FILE}: {size} bytes, the index says {index['nbytes']}")
    raw = np.memmap(folder / WEIGHTS_FILE, dtype=np.uint8, mode="c")
    arrays = {}
    for entry in index["variables"]:
        dtype = _numpy_dtype(entry["dtype"])
        count = int(np.prod(entry["shape"], dtype=np.int64))
        start = int(entry["offset"])
        view = raw[start : start + count * dtype.itemsize].view(dtype)
        arrays[entry["path"]] = view.reshape(entry["shape"])
    return arrays


def _check_cover(model: keras.Model, arrays: Mapping[str, np.ndarray]) -> None:
    """Every variable gets exactly one array of its shape, and no array is left over."""
    paths = [v.path for v in model.weights]
    if len(set(paths)) != len(paths) or set(paths) != set(arrays):
        raise ValueError(
            "flat weights and backbone variables differ: "
            f"missing {sorted(set(paths) - set(arrays))[:5]}, "
            f"unused {sorted(set(arrays) - set(paths))[:5]}"
        )
    for variable in model.weights:
        if tuple(arrays[variable.path].shape) != tuple(variable.shape):
            raise ValueError(
                f"{variable.path}: flat shape {arrays[variable.path].shape} != {variable.shape}"
            )


def build_with_weights(
    build: Callable[[], keras.Model], arrays: Mapping[str, np.ndarray]
) -> tuple[keras.Model, bool]:
    """`build()` with every variable created from `arrays` (by variable path) in one pass.

    Returns the model and whether the one-pass route was taken (else: built, then assigned).
    """
    try:
        return _build_deferred(build, arrays), True
    except _DeferredUnsupported as exc:
        log.warning("one-pass weight loading unavailable (%s); assigning instead", exc)
    model = build()
    _check_cover(model, arrays)
    for variable in model.weights:
        variable.assign(arrays[variable.path])
    return model, False


class _DeferredUnsupported(RuntimeError):
    """This Keras version does not defer variables the way `_build_deferred` expects."""


def _build_deferred(build: Callable[[], keras.Model], arrays: Mapping[str, np.ndarray]):
    from keras.src.backend.common import variables as keras_variables

    initialize_all = getattr(keras_variables, "initialize_all_variables", None)
    if initialize_all is None:
        raise _DeferredUnsupported("keras has no initialize_all_variables")
    with keras.StatelessScope(initialize_variables=False):
        model = build()
    deferred = [
        v
        for v in model.weights
        if getattr(v, "_initializer", None) is not None and getattr(v, "_value", 0) is None
    ]
    used: list[str] = []
    try:
        if len(deferred) != len(model.weights):
            raise _DeferredUnsupported("variables were not deferred")
        _check_cover(model, arrays)
        for variable in deferred:

            def initializer(shape: Any, dtype: Any = None, path: str = variable.path) -> Any:
                used.append(path)
                return arrays[path]

            variable._initializer = initializer
    except BaseException:
        for variable in deferred:  # this model is dropped: the cheapest fill, not a random one
            variable._initializer = keras.initializers.Zeros()
        raise
    finally:
        initialize_all()  # never leave deferred variables for a later scope to initialise
    if sorted(used) != sorted(arrays):
        raise ValueError("not every variable was created from the flat weights")
    return model


def load_flat(
    folder: Path, build: Callable[[dict[str, Any]], keras.Model]
) -> tuple[keras.Model, FlatLoad]:
    """The model saved in `folder`: `build(config)` with the saved weights in its variables."""
    folder = Path(folder)
    started = time.perf_counter()
    config = json.loads((folder / CONFIG_FILE).read_text())
    arrays = read_arrays(folder)
    mapped = time.perf_counter()
    model, one_pass = build_with_weights(lambda: build(config), arrays)
    done = time.perf_counter()
    nbytes = sum(a.nbytes for a in arrays.values())
    return model, FlatLoad(mapped - started, done - mapped, nbytes, one_pass)
