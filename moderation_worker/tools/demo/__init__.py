"""`moderation-worker demo`: the whole pipeline on a laptop, ending with a summary table.

A newcomer has no Kafka cluster, no GPU and no Kaggle account, so the demo brings its own
broker (embedded Tansu, in-memory) and runs the *production* worker (`moderation-worker worker`
as a subprocess, configured only through `MODERATION_*` variables) against it. It then does
what a platform team's services would do: produce comments keyed by id, read the verdict and
dead-letter topics, and account for every event. The worker runs three classifiers on one base
model (hate and violence enforced, directed in shadow), routed by each event's `community`;
halfway through the stream the demo publishes one threshold change to the control topic, as an
operator would, and the summary shows the verdicts decided before and after it.

Events are matched to outcomes by the input's (partition, offset), which every verdict and dead
letter carries, not by id: an injected invalid-JSON event has no id, a user's file may repeat
ids, and an at-least-once redelivery shows up as a second outcome for the same position.

Everything heavy (aiokafka, tqdm, sklearn) is imported inside functions, so importing this
package costs nothing to the rest of the command line, and the demo process itself never imports
Keras: the model lives only in the worker.

The parts, by role:
    config       `DemoConfig` (the command line as a value), the worker's settings, the
                 demo's classifiers and routes, the planned `LiveChange`
    inputs       the events to produce: samples, a user's file or ETHOS, plus two bad ones
    stream       producing them and reading verdicts and dead letters back
    live_change  the control record published halfway, and the wait until the worker has it
    progress     status lines and bars on stderr, the wait for the worker
    summary      every figure, `verdicts.jsonl` and `summary.json`
    figures      the per-classifier, shadow and per-control-version figures
    table        the summary as text on stdout
    run          broker, topics, worker, stream, summary; everything started is stopped

Example:
    config = DemoConfig(model="tiny", out=Path("runs/demo/verdicts.jsonl"))
    report = run_demo(config)
    print(render_table(report))
"""

from adapters.kafka_admin import normalize_broker_url
from moderation_worker.tools.demo.config import (
    DEFAULT_OUT,
    DEMO_CLASSIFIERS,
    DEMO_DEFAULT_ROUTE,
    DEMO_ROUTES,
    EMBEDDED_GROUP_TIMING,
    EXTERNAL_GROUP_TIMING,
    FAUST_FETCH_MAX_WAIT_S,
    DemoConfig,
    DemoError,
    LiveChange,
    demo_classifiers,
    demo_settings,
)
from moderation_worker.tools.demo.inputs import (
    SAMPLE_COMMENTS,
    DemoEvent,
    DemoInput,
    bad_events,
    load_demo_input,
)
from moderation_worker.tools.demo.live_change import AppliedChange, apply_live_change
from moderation_worker.tools.demo.progress import Console, wait_for_worker
from moderation_worker.tools.demo.run import run_demo, run_demo_command, signals_deferred
from moderation_worker.tools.demo.stream import Position, ReadBack, StreamResult, stream_events
from moderation_worker.tools.demo.summary import (
    DemoReport,
    batch_fill_from_metrics,
    build_report,
    model_description,
    write_verdicts,
)
from moderation_worker.tools.demo.table import render_table
from moderation_worker.tools.worker_process import WorkerProcess, worker_environment

__all__ = [
    "DEFAULT_OUT",
    "DEMO_CLASSIFIERS",
    "DEMO_DEFAULT_ROUTE",
    "DEMO_ROUTES",
    "EMBEDDED_GROUP_TIMING",
    "EXTERNAL_GROUP_TIMING",
    "FAUST_FETCH_MAX_WAIT_S",
    "SAMPLE_COMMENTS",
    "AppliedChange",
    "Console",
    "DemoConfig",
    "DemoError",
    "DemoEvent",
    "DemoInput",
    "DemoReport",
    "LiveChange",
    "ReadBack",
    "Position",
    "StreamResult",
    "WorkerProcess",
    "apply_live_change",
    "bad_events",
    "batch_fill_from_metrics",
    "build_report",
    "demo_classifiers",
    "demo_settings",
    "load_demo_input",
    "model_description",
    "normalize_broker_url",
    "render_table",
    "run_demo",
    "run_demo_command",
    "signals_deferred",
    "stream_events",
    "wait_for_worker",
    "worker_environment",
    "write_verdicts",
]
