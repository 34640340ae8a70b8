"""The model a worker scores with: given ready, or loaded once from a factory; warmed up once.

Loading Gemma takes tens of seconds and the warm-up compiles every batch shape, so both run
either before the worker joins its consumer group (`prepare`, the standalone `run()`) or off the
event loop (`prepare_in`, an app that loads at start), never on it: a blocked loop misses its
heartbeats and the group rebalances.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from moderation_worker.processor import BatchProcessor
from moderation_worker.verdicts import ProbabilityModel

log = logging.getLogger("moderation_worker.worker")

ModelOrFactory = ProbabilityModel | Callable[[], ProbabilityModel]


class ModelLoader:
    """Holds the model; `on_loaded(model)` runs once it is there (at once for a given model).

    Args:
        model: a loaded `ProbabilityModel`, or a factory that loads one.
        batch_size: the fixed batch shape the warm-up builds.
        on_loaded: binds the model to what depends on it (threshold, metrics); runs in the
            caller's thread, on the event loop for `prepare_in`.
    """

    def __init__(
        self,
        model: ModelOrFactory,
        batch_size: int,
        on_loaded: Callable[[ProbabilityModel], None],
    ) -> None:
        self.batch_size = batch_size
        self._on_loaded = on_loaded
        self.model: ProbabilityModel | None = None
        self._factory: Callable[[], ProbabilityModel] | None = None
        self._warmed_up = False
        if _is_model(model):
            self._loaded(model)  # type: ignore[arg-type]
        else:
            self._factory = model  # type: ignore[assignment]

    def prepare(self) -> ProbabilityModel:
        """Load (once) and warm up (once), in this thread."""
        if self.model is None:
            self._loaded(self._load())
        self._warm_up()
        assert self.model is not None
        return self.model

    async def prepare_in(self, executor: Executor) -> ProbabilityModel:
        """`prepare` with the slow parts in `executor`, so the event loop stays free."""
        loop = asyncio.get_running_loop()
        if self.model is None:
            self._loaded(await loop.run_in_executor(executor, self._load))
        await loop.run_in_executor(executor, self._warm_up)
        assert self.model is not None
        return self.model

    def _loaded(self, model: ProbabilityModel) -> None:
        self.model = model
        self._on_loaded(model)

    def _load(self) -> ProbabilityModel:
        assert self._factory is not None
        started, cpu = time.perf_counter(), time.process_time()
        log.info("model loading")
        model = self._factory()
        log.info("model loaded", extra=_took(started, cpu))
        return model

    def _warm_up(self) -> None:
        """Build and check every compiled shape before the first batch (`ModelUnavailable`)."""
        if self._warmed_up or self.model is None:
            return
        started, cpu = time.perf_counter(), time.process_time()
        processor = BatchProcessor(self.model, 0.5, batch_size=self.batch_size)
        processor.model = _TimedShapes(processor.model, len(processor.canary_rows))
        shapes = processor.warm_up()
        self._warmed_up = True
        log.info("model warmed up", extra={"shapes": shapes, **_took(started, cpu)})


def _is_model(obj: object) -> bool:
    """A loaded model (one classifier, or a set scoring rows), not a factory of one."""
    return hasattr(obj, "predict_rows") or (
        hasattr(obj, "predict_proba") and hasattr(obj, "labels")
    )


class _TimedShapes:
    """The warm-up's row model, logging how long each canary call (one compiled shape) took:
    the per-shape figures of the cold-start measurement (`tools/cold_start`)."""

    def __init__(self, model: Any, canaries: int) -> None:
        self._model = model
        self._calls = 0
        buckets = tuple(getattr(model, "length_buckets", ()) or ())
        # Canary i is bucket i when every bucket has one (a bucket no text fits has none).
        self._lengths = buckets if len(buckets) == canaries else ()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict_rows(self, texts: Sequence[str], names: Sequence[str]) -> Any:
        started, cpu = time.perf_counter(), time.process_time()
        out = self._model.predict_rows(texts, names)
        index, self._calls = self._calls, self._calls + 1
        length = self._lengths[index] if index < len(self._lengths) else None
        extra = {"shape": index + 1, "length": length, **_took(started, cpu)}
        log.info("shape compiled", extra=extra)
        return out


def _took(started: float, cpu: float) -> dict[str, float]:
    """Wall seconds, and CPU seconds of the whole process (every thread): the CPU figure is
    what a phase costs even on a machine shared with other jobs, where wall time is not."""
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
    }
