"""The machine a run measured: CPU, accelerator and backend actually used, versions, and the
other processes that competed for the cores while it ran."""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The SIMD extensions that bound a float32/bfloat16 matmul on this CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = ("avx", "fma", "amx", "vnni", "bf16")
                return " ".join(sorted(f for f in flags if any(k in f for k in keep)))
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    """1-minute load average: above the core count, something else competed for the CPU."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def other_load() -> str:
    """Other moderation-worker jobs on the machine right now (training, scoring, evaluation).

    On a shared machine these skew every timing; the report names them. The bench's own
    process and its thread-variant children are left out.
    """
    own = {os.getpid(), os.getppid()}
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            pid = int(cmdline.parent.name)
            args = [a.decode("utf-8", "replace") for a in cmdline.read_bytes().split(b"\0") if a]
        except (OSError, ValueError):
            continue
        if pid in own or not any(a.endswith("moderation-worker") for a in args[:3]):
            continue
        sub = next((a for a in args[1:] if not a.startswith("-") and "/" not in a), "")
        if sub == "bench":
            continue
        found.append(f"pid {pid}: moderation-worker {sub}")
    return "; ".join(sorted(found))


def _process_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds so far, short command) for every process we can read."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
            head, rest = raw.rsplit(")", 1)
            fields = rest.split()
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        name = " ".join(a.decode("utf-8", "replace").rsplit("/", 1)[-1] for a in args[:3] if a)
        name = name or head.split("(", 1)[-1]
        table[int(stat.parent.name)] = (
            int(fields[1]),
            (int(fields[11]) + int(fields[12])) / tick,
            name[:80],
        )
    return table


class OtherCpu:
    """CPU time other processes take while the bench runs, sampled every few seconds.

    The machine is shared: a training run, a CI run or another engineer's tests on the same
    cores lower every rate here. The report states how much CPU they took, so a reader can
    tell a clean run from a loaded one.
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        import threading

        self.interval_s = interval_s
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}
        self._last = _process_table()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-other-cpu", daemon=True)
        self._thread.start()

    def _mine(self, pid: int, table: dict[int, tuple[int, float, str]]) -> bool:
        me = os.getpid()
        for _ in range(64):
            if pid == me:
                return True
            if pid not in table or pid <= 1:
                return False
            pid = table[pid][0]
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        table = _process_table()
        for pid, (_, cpu, name) in table.items():
            if self._mine(pid, table):
                continue
            before = self._last.get(pid)
            delta = cpu - before[1] if before is not None else cpu
            if delta > 0:
                self.seconds[name] = self.seconds.get(name, 0.0) + delta
        self._last = table

    def share(self) -> float:
        """Other processes' CPU as a fraction of all cores over the run so far."""
        wall = max(1e-9, time.monotonic() - self.started)
        return sum(self.seconds.values()) / (wall * (os.cpu_count() or 1))

    def summary(self) -> str:
        top = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:3]
        names = "; ".join(f"{name} {sec:.0f} s" for name, sec in top if sec >= 1)
        return (
            f"other processes took {sum(self.seconds.values()):.0f} CPU-s, "
            f"{100 * self.share():.1f} % of the machine" + (f" (top: {names})" if names else "")
        )

    def stop(self) -> None:
        self._stop.set()
        self.sample()


#: Distributions behind each Keras backend, named in the versions line when it is active.
BACKEND_PACKAGES = {"jax": ("jax", "jaxlib"), "torch": ("torch",)}


def versions(backend: str | None = None) -> dict[str, str]:
    names = ["keras", "keras-hub", "tensorflow", *BACKEND_PACKAGES.get(backend or "", ())]
    out = {"python": platform.python_version()}
    for name in (*names, "numpy", "faust-streaming"):
        try:
            out[name] = package_version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class Accelerator:
    """The device a run's `keras.ops` ran on, as the active Keras backend sees it.

    Args:
        backend: `keras.backend.backend()`.
        kind: "GPU", "TPU" or "MPS" when `devices` is not empty, else "CPU".
        devices: one name per accelerator device the backend sees, e.g. "NVIDIA H200".
        cpu: the host CPU's model name.
        note: why detection failed, when it did.
    """

    backend: str
    kind: str = "CPU"
    devices: tuple[str, ...] = ()
    cpu: str = ""
    note: str = ""

    @property
    def found(self) -> bool:
        return bool(self.devices)

    def describe(self) -> str:
        """The report's words: device names and count, or which CPU it ran on and why."""
        if self.devices:
            counts = Counter(self.devices)
            names = ", ".join(f"{n} x {name}" if n > 1 else name for name, n in counts.items())
            return f"{names} ({self.kind}, {self.backend})"
        why = f"; {self.note}" if self.note else ""
        return f"none ({self.backend} sees no GPU{why}); ran on the CPU: {self.cpu}"


def _tensorflow_devices() -> tuple[str, list[str]]:
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        found = tf.config.list_physical_devices(kind)
        if found:
            names = []
            for device in found:
                try:
                    details = tf.config.experimental.get_device_details(device)
                except (ValueError, RuntimeError):
                    details = {}
                names.append(details.get("device_name") or device.name)
            return kind, names
    return "CPU", []


def _jax_devices() -> tuple[str, list[str]]:
    import jax

    found = [d for d in jax.devices() if d.platform != "cpu"]
    if not found:
        return "CPU", []
    return found[0].platform.upper(), [getattr(d, "device_kind", "") or d.platform for d in found]


def _torch_devices() -> tuple[str, list[str]]:
    import torch

    if torch.cuda.is_available():
        return "GPU", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "MPS", ["Apple MPS"]
    return "CPU", []


#: How each Keras backend lists its devices; each imports only its own framework.
DEVICE_LISTERS = {
    "tensorflow": _tensorflow_devices,
    "jax": _jax_devices,
    "torch": _torch_devices,
}


def detect_accelerator(backend: str | None = None) -> Accelerator:
    """Ask the active Keras backend (only that one) which accelerators it runs on.

    A backend without a lister (numpy, openvino) runs on the CPU. A failing driver query is
    reported in `note`, never raised: the bench still measures the CPU.
    """
    if backend is None:
        import keras

        backend = keras.backend.backend()
    cpu = cpu_model()
    lister = DEVICE_LISTERS.get(backend)
    if lister is None:
        return Accelerator(backend, cpu=cpu)
    try:
        kind, devices = lister()
    except Exception as exc:  # noqa: BLE001 - a broken driver must not stop a CPU bench
        return Accelerator(backend, cpu=cpu, note=f"device query failed: {exc!r}"[:200])
    return Accelerator(backend, kind if devices else "CPU", tuple(devices), cpu)


def machine_info() -> dict[str, Any]:
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    accelerator = detect_accelerator()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "flags": cpu_flags(),
        "memory_gib": mem,
        "platform": platform.platform(),
        "backend": accelerator.backend,
        "accelerator": accelerator.describe(),
        "accelerator_found": accelerator.found,
    }
