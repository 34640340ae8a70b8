"""Compiled shapes kept across restarts: XLA's persistent cache (TensorFlow) and JAX's.

Why: every length bucket is a compiled graph, and a worker compiles all of them before it
joins its consumer group. Without a persistent cache a restarted replica pays the whole XLA
compile again; with it, a second start on the same machine loads each compiled executable from
disk. Tracing the Keras model still happens on every start (TensorFlow also lowers the traced
graph to XLA again before it can look the executable up), so the cache removes the
compile, not the whole warm-up (BENCHMARKS.md, "Cold start").

Both caches are switched on through the environment, because TensorFlow reads `TF_XLA_FLAGS`
once, when its runtime starts (the first op, not the import), and JAX reads its
`JAX_*` variables when it is imported (`jax.config` is updated too when it already is). So
`enable()` must run before the model is built: the worker command calls it first thing.

The folder is one per backend version and CPU: an XLA:CPU executable is machine code for the
CPU that compiled it, and a cache shared by hosts with different CPUs could crash a worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

log = logging.getLogger("moderation_worker.model")

#: `[speed] compile_cache_dir` values that switch the persistent cache off.
OFF_VALUES = ("", "off", "false", "no", "none")
TF_FLAG = "--tf_xla_persistent_cache_directory"


def default_dir() -> Path:
    """`$MODERATION_CACHE_DIR/compile`, else `~/.cache/moderation-worker/compile` (the folder
    the model conversion is cached in, so one volume holds both)."""
    root = os.environ.get("MODERATION_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "moderation-worker") / "compile"


def resolve(setting: Path | str | None) -> Path | None:
    """The cache folder a `compile_cache_dir` setting means: None -> `default_dir()`,
    `'off'` (or '') -> None (no persistent cache), else the path, `~` expanded."""
    if setting is None:
        return default_dir()
    if isinstance(setting, str) and setting.strip().lower() in OFF_VALUES:
        return None
    return Path(setting).expanduser()


def machine_tag() -> str:
    """A short fingerprint of this CPU's instruction set (and architecture)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((ln for ln in fh if ln.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    text = f"{platform.machine()} {' '.join(sorted(flags.split(':', 1)[-1].split()))}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def backend_dirs(folder: Path) -> dict[str, Path]:
    """The cache folder of each installed backend under `folder`."""
    tag = machine_tag()
    dirs = {}
    for backend, package in (("tensorflow", "tensorflow"), ("jax", "jaxlib")):
        found = _version(package)
        if found is not None:
            dirs[backend] = folder / f"{backend}-{found}-{tag}"
    return dirs


def enable(setting: Path | str | None) -> dict[str, Path]:
    """Point TensorFlow's and JAX's persistent compilation caches at `setting`'s folder.

    Returns backend -> folder (empty when off). Settings the user made in the environment
    (`TF_XLA_FLAGS` naming a cache folder, `JAX_COMPILATION_CACHE_DIR`) win. Idempotent.
    """
    folder = resolve(setting)
    if folder is None:
        log.info("compile cache off", extra={"compile_cache_dir": None})
        return {}
    dirs = backend_dirs(folder)
    if "tensorflow" in dirs:
        flags = os.environ.get("TF_XLA_FLAGS", "")
        if TF_FLAG not in flags:
            os.environ["TF_XLA_FLAGS"] = f"{flags} {TF_FLAG}={dirs['tensorflow']}".strip()
    if "jax" in dirs:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(dirs["jax"]))
        # By default JAX keeps only compiles over 1 s; a warm-up compiles few, all worth keeping.
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        if "jax" in sys.modules:  # imported already: its config read the environment before
            _update_jax_config()
    log.info("compile cache", extra={"compile_cache_dir": str(folder)})
    return dirs


def _update_jax_config() -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.config.update(
        "jax_persistent_cache_min_entry_size_bytes",
        int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
    )


def cached_files(setting: Path | str | None) -> int:
    """How many files the cache folder holds (0 when off or absent): what the tool reports."""
    folder = resolve(setting)
    if folder is None or not folder.is_dir():
        return 0
    return sum(1 for p in folder.rglob("*") if p.is_file())
