"""What the person running the demo sees while it runs: status lines and bars on stderr (stdout
is kept for the summary table), and which step a slow-starting worker is on."""

from __future__ import annotations

import sys
from typing import Any

from moderation_worker.tools.demo.config import DemoError
from moderation_worker.tools.worker_process import WorkerNotReady, WorkerProcess


class Console:
    """Status lines and tqdm bars on stderr; stdout is kept for the summary table."""

    def __init__(self, progress: bool | None = None) -> None:
        self.progress = sys.stderr.isatty() if progress is None else progress

    def say(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"demo: {message}", file=sys.stderr)

    def bar(self, **kwargs: Any) -> Any:
        from tqdm import tqdm

        return tqdm(file=sys.stderr, disable=not self.progress, dynamic_ncols=True, **kwargs)


def wait_for_worker(
    worker: WorkerProcess, timeout: float, console: Console, model: str
) -> dict[str, Any]:
    """Block until `/health` is ready with partitions assigned; show which step is slow.

    The worker loads its model before it starts Faust, so `/health` answers only after
    the model is in memory; the log says when loading starts and ends.
    """
    phases = {
        "start": "starting the worker process",
        "load": f"loading model {model}…",
        "join": "model loaded; joining the consumer group…",
    }
    phase = "start"
    console.say(phases[phase])
    spinner = console.bar(total=None, desc=phases[phase], bar_format="{desc} [{elapsed}]")

    def follow_log() -> None:
        nonlocal phase
        messages = {r.get("msg") for r in worker.log_records()}
        new = "join" if "model loaded" in messages else phase
        if new == "start" and "worker starting" in messages:
            new = "load"
        if new != phase:
            phase = new
            spinner.set_description_str(phases[phase])
            console.say(phases[phase])
        spinner.refresh()

    try:
        return worker.wait_ready(timeout, poll_s=0.2, on_poll=follow_log)
    except WorkerNotReady as exc:
        raise DemoError(
            f"the worker was not ready after {timeout:.0f} s ({phases[phase]}); "
            f"last /health {exc.last_health}; log ({worker.log_path}):\n{worker.log_tail()}"
        ) from None
    finally:
        spinner.close()
