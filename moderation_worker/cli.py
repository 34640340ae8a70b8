"""`moderation-worker` command line: train, calibrate, evaluate, score, worker, config, control,
learn, labels, demo, bench.

This module only builds the argument parser and dispatches; the commands themselves are in
`moderation_worker/tools/commands.py` and `tools/control.py`, which call the library.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from moderation_worker.settings import DEFAULT_MODEL  # noqa: E402
from moderation_worker.tools import (  # noqa: E402
    cold_start,
    control,
    cost,
    loop_curve,
    per_label,
    recipe_search,
)
from moderation_worker.tools.commands import (  # noqa: E402
    cmd_bench,
    cmd_config,
    cmd_demo,
    cmd_evaluate,
    cmd_quality,
    cmd_score,
    cmd_train,
    cmd_worker,
)
from moderation_worker.tools.console import run as console_run  # noqa: E402
from moderation_worker.tools.loop_commands import add_loop_parsers  # noqa: E402


def _add_model_args(p: argparse.ArgumentParser, lora_default: str | None = "default") -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="gemma3-270m | preset:NAME | tiny | encoder:PREFIX (train: encoder:minilm)",
    )
    p.add_argument(
        "--lora",
        default=lora_default,
        help="LoRA weights (.lora.h5), 'default' (shipped for the model) or 'none' (zero-shot)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per model call")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="'ethos' (public URL), 'ethos:PATH', 'ethos-multi:CATEGORY:PATH' (one category "
        "of the ETHOS multi-label file), or a CSV/JSONL file with text,label columns",
    )
    p.add_argument("--validation-rows", type=int, default=100, help="ETHOS: validation rows")
    p.add_argument("--seed", type=int, default=1234)


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moderation-worker",
        description="Agile hate-speech classification with a LoRA-tuned Gemma, on a Kafka stream.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="LoRA fine-tune on labelled data; saves weights + metadata")
    _add_model_args(p, lora_default=None)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="output path prefix (writes PREFIX.lora.h5/.json)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument(
        "--learning-rate", type=float, default=None, help="default 5e-4 (LoRA), 5e-5 (encoder)"
    )
    p.add_argument("--train-batch-size", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument(
        "--loss",
        choices=["vocab", "labels"],
        default="vocab",
        help="vocab: LM loss at the label position (codelab); labels: softmax over labels",
    )
    p.add_argument(
        "--balance", action="store_true", help="weight examples by inverse class frequency"
    )
    p.add_argument("--target-layers", default="query_dense,value_dense,query,value")
    p.add_argument("--train-rows", type=int, default=None, help="use only the first N train rows")
    p.add_argument(
        "--negatives-per-positive",
        type=float,
        default=None,
        help="train on every positive and at most this many negatives per positive",
    )
    p.add_argument("--policy", default="max-f1", help="threshold policy on the validation split")
    p.add_argument("--labels", default=None, help="comma-separated labels, negative first")
    p.add_argument("--positive-label", default=None)
    p.add_argument("--instructions", default=None)
    p.add_argument("--separator", default=None, help=r"e.g. '\n<separator>\n'")
    p.add_argument("--sequence-length", type=int, default=128)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="choose the threshold on the validation split")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--policy", default="max-f1", help="max-f1 | youden | fpr<=X | precision>=X")
    p.add_argument("--out", default="threshold.toml", help="threshold file the worker reads")
    p.add_argument(
        "--publish", action="store_true", help="also publish it on the control topic (the fleet)"
    )
    p.add_argument("--classifier", default=None, help="whose threshold it is (with --publish)")
    p.add_argument("--config", default=None, help="TOML settings file (broker, control topic)")
    p.set_defaults(func=control.cmd_calibrate)

    p = sub.add_parser("evaluate", help="metrics report (JSON) and plots (PNG) on a split")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--split", choices=["train", "validation", "test"], default="test")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--threshold-file", default=None)
    p.add_argument("--policy", default=None, help="calibrate on validation first with this policy")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--out", default="runs/evaluate")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quality", help="several models, one table: metrics, CIs, policies, plots")
    _add_data_args(p)
    p.add_argument(
        "--entry",
        action="append",
        required=True,
        help="NAME=MODEL[@LORA], e.g. tfidf=baseline:tfidf, zero-shot=gemma3-270m, "
        "lora-800=gemma3-270m@weights.lora.h5 (repeat)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", default="reports/quality")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("score", help="JSON lines {id, text} in, one verdict per line out")
    _add_model_args(p)
    p.add_argument("input", nargs="?", default="-", help="JSONL file, or - for stdin")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--max-text-chars", type=int, default=20_000)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("worker", help="run the Faust stream worker with the settings")
    p.add_argument("--config", default=None, help="TOML settings file")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("config", help="print the effective settings")
    p.add_argument("--config", default=None, help="TOML settings file")
    p.set_defaults(func=cmd_config)

    _add_control_parser(sub)

    p = sub.add_parser("bench", help="speed: naive vs batched vs label head, tuning, pipeline")
    p.add_argument("--quick", action="store_true", help="tiny model, tiny counts (< 60 s)")
    p.add_argument(
        "--model",
        default=None,
        help="model source (default gemma3-270m; quick: tiny; random:gemma3-270m or "
        "random:gemma-2b: that architecture with random weights, for speed alone)",
    )
    p.add_argument(
        "--out", default=None, help="markdown file (default BENCHMARKS.md; --quick: a temp file)"
    )
    p.add_argument("--batch-sizes", default=None, help="comma-separated, default 1,8,32,64")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    p.add_argument(
        "--sections",
        default=None,
        help="subset of scoring,tuning,length,threads,pipeline,policies,peer,coldstart,gpu "
        "(gpu: only if named)",
    )
    p.add_argument(
        "--peer-texts", type=int, default=None, help="comments the llama.cpp peer row scores"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="embedded broker + real worker + sample stream -> summary")
    _add_model_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--input", default=None, help="CSV/JSONL with text, optional label, id")
    source.add_argument("--ethos", default=None, help="ETHOS CSV: stream its test split")
    p.add_argument("--limit", type=int, default=None, help="stream only the first N comments")
    p.add_argument("--rate", type=float, default=None, help="events/s (default: unthrottled)")
    p.add_argument(
        "--with-bad-events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="inject an invalid-JSON and an empty-text event, to show the dead-letter topic",
    )
    p.add_argument(
        "--live-change",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="halfway through, publish a threshold change (hate, gaming) to the control topic",
    )
    p.add_argument(
        "--loop",
        action="store_true",
        help="then one turn of the agile loop on the tiny model (labels -> candidate -> promotion)",
    )
    p.add_argument("--broker", default=None, help="a real broker URL instead of embedded Tansu")
    p.add_argument("--out", default="runs/demo/verdicts.jsonl", help="verdicts JSONL to write")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for outcomes")
    p.add_argument("--config", default=None, help="TOML settings file for the worker")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_control_parser(sub: argparse._SubParsersAction) -> None:
    """`control show | set-threshold | set-mode | set-route | set-adapter | clear`: live policy."""
    group = sub.add_parser("control", help="show or change thresholds, modes, routes live")
    commands = group.add_subparsers(dest="control_command", required=True)

    def command(name: str, func, help: str, audit: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        p.add_argument("--config", default=None, help="TOML settings file")
        if audit:
            p.add_argument("--by", default=None, help="who (default: the login name)")
            p.add_argument("--reason", default=None, help="why, for the audit trail")
        p.set_defaults(func=func)
        return p

    command("show", control.cmd_control_show, "the policy in force and every record", False)
    p = command("set-threshold", control.cmd_control_set_threshold, "a classifier's threshold")
    p.add_argument("classifier")
    p.add_argument("value", help="a number in [0, 1]")
    p.add_argument("--community", default=None, help="only for this community")
    p = command("set-mode", control.cmd_control_set_mode, "enforce, or shadow (never decides)")
    p.add_argument("classifier")
    p.add_argument("mode", choices=["enforce", "shadow"])
    p = command("set-route", control.cmd_control_set_route, "classifiers of a community")
    p.add_argument("community", help="a community, or '*' for events without a route")
    p.add_argument("classifiers", help="comma-separated, e.g. hate,violence")
    p = command("set-adapter", control.cmd_control_set_adapter, "new weights for a classifier")
    p.add_argument("classifier")
    p.add_argument("lora", help="a .lora.h5 path every worker can read, or shipped:<name>")
    p.add_argument("--sha256", default=None, help="the file's sha256 (default: computed here)")
    p = command("clear", control.cmd_control_clear, "remove an override (tombstone)", False)
    p.add_argument("key", help="e.g. threshold/hate/gaming, mode/violence, route/*")
    add_loop_parsers(sub, commands)
    loop_curve.add_parser(sub)
    cold_start.add_parser(sub)
    console_run.add_parser(sub)
    cost.add_parser(sub)
    recipe_search.add_parser(sub)
    per_label.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"moderation-worker {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
