"""`moderation-worker` command line: train, calibrate, evaluate, score, worker, config, demo, bench.

This is the composition root: the only core module that reaches into `adapters/` (to load
model sources and run the Faust worker), so the rest of the core stays free of the edges.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from moderation_worker.settings import DEFAULT_MODEL, SettingsError, load_settings  # noqa: E402


def _add_model_args(p: argparse.ArgumentParser, lora_default: str | None = "default") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="gemma3-270m | preset:NAME | tiny")
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
        help="'ethos' (public URL), 'ethos:PATH', or a CSV/JSONL file with text,label columns",
    )
    p.add_argument("--validation-rows", type=int, default=100, help="ETHOS: validation rows")
    p.add_argument("--seed", type=int, default=1234)


def _prompt_from_args(args: argparse.Namespace):
    from moderation_worker.model.prompts import (
        DEFAULT_INSTRUCTIONS,
        DEFAULT_LABELS,
        DEFAULT_SEPARATOR,
        PromptSettings,
    )

    labels = tuple(s.strip() for s in args.labels.split(",")) if args.labels else DEFAULT_LABELS
    return PromptSettings(
        labels=labels,
        positive_label=args.positive_label or labels[-1],
        instructions=args.instructions or DEFAULT_INSTRUCTIONS,
        separator=(args.separator or DEFAULT_SEPARATOR).encode().decode("unicode_escape"),
        sequence_length=args.sequence_length,
    )


def _classifier(args: argparse.Namespace, prompt=None, threshold: float | None = None):
    from moderation_worker.model.sources import build_classifier

    return build_classifier(
        args.model, args.lora, threshold=threshold, batch_size=args.batch_size, prompt=prompt
    )


def _print_json(obj: Any) -> None:
    sys.stdout.write(
        orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode()
    )
    sys.stdout.write("\n")


# --------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from moderation_worker.model.classifier import AgileClassifier
    from moderation_worker.model.lora import LoraMetadata, lora_paths, save_lora
    from moderation_worker.model.prompts import PromptEncoder
    from moderation_worker.model.sources import load_model_source
    from moderation_worker.model.training import TrainingConfig, train_lora
    from moderation_worker.thresholds import choose_threshold
    from moderation_worker.tools.data import load_splits
    from moderation_worker.tools.evaluation import evaluate

    splits = load_splits(args.data, args.validation_rows, args.seed)
    train = (
        splits.train if args.train_rows is None else splits.train.take(slice(0, args.train_rows))
    )
    print(
        f"data: {len(train)} train / {len(splits.validation)} validation / {len(splits.test)} "
        f"test rows from {args.data} (sha256 {(train.sha256 or '')[:12]})",
        file=sys.stderr,
    )
    prompt = _prompt_from_args(args)
    base = load_model_source(args.model)
    encoder = PromptEncoder(base.tokenizer, prompt)
    config = TrainingConfig(
        rank=args.rank,
        learning_rate=args.learning_rate,
        batch_size=args.train_batch_size,
        epochs=args.epochs,
        seed=args.seed,
        loss=args.loss,
        balance_classes=args.balance,
        target_layers=tuple(args.target_layers.split(",")),
    )
    labels = np.where(train.labels == 1, prompt.positive_index, 1 - prompt.positive_index)
    if len(prompt.labels) != 2:
        raise SystemExit("train: the ETHOS/CSV loaders give binary labels; use exactly two labels")
    result = train_lora(base.backbone, encoder, train.texts, labels, config)
    print(
        f"trained in {result.seconds:.0f}s, {result.trainable_parameters} LoRA parameters",
        file=sys.stderr,
    )

    clf = AgileClassifier(base, prompt=prompt, batch_size=args.batch_size)
    metrics: dict[str, Any] = {"train_history": result.history}
    threshold, policy = 0.5, None
    if len(splits.validation) and len(set(splits.validation.labels.tolist())) == 2:
        p_val = clf.p_positive(splits.validation.texts, progress=True)
        choice = choose_threshold(splits.validation.labels, p_val, args.policy)
        threshold, policy = choice.threshold, choice.policy
        metrics["validation"] = evaluate(splits.validation.labels, p_val, threshold)
        metrics["validation"].pop("roc_curve", None)
    metadata = LoraMetadata(
        base_model=base.name,
        prompt=prompt,
        rank=config.rank,
        target_layers=config.target_layers,
        threshold=threshold,
        threshold_policy=policy,
        data_sha256=train.sha256,
        training={
            **config.to_dict(),
            "train_rows": len(train),
            "validation_rows": len(splits.validation),
            "data": str(args.data),
            "seconds": round(result.seconds, 1),
            "trainable_parameters": result.trainable_parameters,
        },
        metrics=metrics,
    )
    weights = save_lora(base.backbone, args.out, metadata)
    print(f"wrote {weights} and {lora_paths(weights)[1]}", file=sys.stderr)
    _print_json(
        {
            "lora_weights": str(weights),
            "threshold": threshold,
            "policy": policy,
            "validation": metrics.get("validation"),
        }
    )
    return 0


# --------------------------------------------------------------------------- calibrate
def cmd_calibrate(args: argparse.Namespace) -> int:
    from moderation_worker.threshold_source import write_threshold_file
    from moderation_worker.thresholds import choose_threshold
    from moderation_worker.tools.data import load_splits

    splits = load_splits(args.data, args.validation_rows, args.seed)
    clf = _classifier(args)
    p_val = clf.p_positive(splits.validation.texts, progress=True)
    choice = choose_threshold(splits.validation.labels, p_val, args.policy)
    extra = {"model": clf.identity.to_dict(), "data": str(args.data), "split": "validation"}
    write_threshold_file(args.out, choice, extra)
    print(
        f"wrote threshold {choice.threshold:.4f} ({choice.policy}) to {args.out}", file=sys.stderr
    )
    _print_json(choice.to_dict())
    return 0


# --------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from moderation_worker.threshold_source import resolve_threshold
    from moderation_worker.tools.data import load_splits
    from moderation_worker.tools.evaluation import bootstrap_ci, evaluate, write_report
    from moderation_worker.tools.plots import plot_confusion, plot_roc, plot_score_histogram

    splits = load_splits(args.data, args.validation_rows, args.seed)
    split = getattr(splits, args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "baseline:tfidf":
        from moderation_worker.tools.baseline import TfidfBaseline

        baseline = TfidfBaseline().fit(list(splits.train.texts), splits.train.labels)
        p_val = baseline.predict_proba(list(splits.validation.texts))[:, 1]
        p = baseline.predict_proba(list(split.texts))[:, 1]
        name, labels = "tfidf-logreg", ("not hateful", "hateful")
        identity = {"base_model": "tfidf-logreg", "lora_sha256": None}
    else:
        clf = _classifier(args)
        p_val = clf.p_positive(splits.validation.texts, progress=True) if args.policy else None
        p = clf.p_positive(split.texts, progress=True)
        name, labels = clf.identity.base_model, tuple(clf.labels)
        identity = clf.identity.to_dict()
    if args.policy and args.threshold is None and args.threshold_file is None:
        from moderation_worker.thresholds import choose_threshold

        choice = choose_threshold(splits.validation.labels, p_val, args.policy)
        threshold, policy = choice.threshold, f"{choice.policy} (validation)"
    else:  # the worker's own rule: flag, file, the model's calibrated one, 0.5
        model = None if args.model == "baseline:tfidf" else clf
        in_force = resolve_threshold(args.threshold, args.threshold_file, model)
        threshold, policy = in_force.value, f"{in_force.source}: {in_force.detail}"
    report = evaluate(split.labels, p, threshold, labels=labels)
    report.update(
        {
            "model": identity,
            "data": str(args.data),
            "split": args.split,
            "threshold_policy": policy,
            "bootstrap": bootstrap_ci(split.labels, p, threshold, n_resamples=args.bootstrap),
        }
    )
    write_report(out / "report.json", report)
    np.save(out / "scores.npy", np.stack([split.labels.astype(np.float32), p]))
    plot_roc({name: (split.labels, p, threshold)}, out / "roc.png")
    plot_confusion(
        split.labels,
        (p >= threshold).astype(int),
        labels,
        out / "confusion.png",
        title=f"{name} on {args.split} (threshold {threshold:.3f})",
    )
    plot_score_histogram(split.labels, p, threshold, out / "scores.png", labels=labels)
    summary = {k: report[k] for k in ("n", "threshold", "f1", "roc_auc", "precision", "recall")}
    summary["threshold_policy"] = policy
    print(f"wrote {out}/report.json, roc.png, confusion.png, scores.png", file=sys.stderr)
    _print_json(summary)
    return 0


# --------------------------------------------------------------------------- quality
def cmd_quality(args: argparse.Namespace) -> int:
    from moderation_worker.tools.data import load_splits
    from moderation_worker.tools.quality import Entry, build_report, load_or_score, render_markdown

    splits = load_splits(args.data, args.validation_rows, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = [Entry.parse(e) for e in args.entry]
    scores = [
        load_or_score(e, splits, out / "scores", lambda en, sp: _score_entry(en, sp, args))
        for e in entries
    ]
    result = build_report(scores, splits, out, bootstrap=args.bootstrap)
    command = (
        "moderation-worker " + " ".join(sys.argv[1:])
        if args.command_line is None
        else args.command_line
    )
    (out / "REPORT.md").write_text(render_markdown(result, command), encoding="utf-8")
    print(f"wrote {out}/REPORT.md, quality.json and figures", file=sys.stderr)
    sys.stdout.write((out / "REPORT.md").read_text(encoding="utf-8"))
    return 0


def _score_entry(entry, splits, args: argparse.Namespace):
    from moderation_worker.tools.quality import score_entry

    return score_entry(entry, splits, batch_size=args.batch_size)


# --------------------------------------------------------------------------- score
def cmd_score(args: argparse.Namespace) -> int:
    from moderation_worker.events import DeadLetter, InvalidEvent, parse_comment
    from moderation_worker.verdicts import make_verdicts

    clf = _classifier(args, threshold=args.threshold)
    stream = open(args.input, "rb") if args.input not in (None, "-") else sys.stdin.buffer
    out = sys.stdout.buffer
    pending: list = []
    counts = {"verdicts": 0, "dead_letters": 0}

    def flush() -> None:
        if not pending:
            return
        probs = clf.predict_proba([c.text for c in pending])
        for verdict in make_verdicts(pending, probs, clf, clf.threshold):
            out.write(orjson.dumps(verdict.to_dict()) + b"\n")
        out.flush()
        counts["verdicts"] += len(pending)
        pending.clear()

    with stream:
        for line_no, raw in enumerate(stream, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                pending.append(parse_comment(raw, args.max_text_chars))
            except InvalidEvent as exc:
                letter = DeadLetter(exc.reason, f"line {line_no}: {exc}", raw)
                sys.stderr.write(orjson.dumps(letter.to_dict()).decode() + "\n")
                counts["dead_letters"] += 1
            if len(pending) >= clf.batch_size:
                flush()
        flush()
    print(
        f"score: {counts['verdicts']} verdicts, {counts['dead_letters']} dead letters "
        "(written to stderr)",
        file=sys.stderr,
    )
    return 0


# --------------------------------------------------------------------------- worker / config
def _settings(args: argparse.Namespace):
    try:
        return load_settings(args.config)
    except SettingsError as exc:
        print(f"moderation-worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_config(args: argparse.Namespace) -> int:
    _print_json(_settings(args).public_dict())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from adapters.delivery_guard import DeliveryConfigError, preflight
    from adapters.faust_app import run_worker
    from moderation_worker.model.prompts import PromptSettings
    from moderation_worker.model.sources import build_classifier

    settings = _settings(args)
    try:
        preflight(settings)  # Faust's env vars weakening delivery: refused before the model loads
    except DeliveryConfigError as exc:
        print(f"moderation-worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    def factory():
        # LoRA metadata carries its own prompt; sequence_length applies to zero-shot models.
        prompt = None
        if settings.sequence_length != PromptSettings().sequence_length:
            prompt = PromptSettings(sequence_length=settings.sequence_length)
        return build_classifier(
            settings.model,
            settings.lora_weights,
            batch_size=settings.batch_size,
            prompt=prompt,
            length_buckets=settings.length_buckets,
        )

    # SIGHUP re-reads the config file and environment, so a threshold edited in either
    # takes effect without reloading the model.
    try:
        run_worker(settings, factory, reload_settings=lambda: load_settings(args.config))
    except DeliveryConfigError as exc:  # build_app's own check (the environment changed since)
        print(f"moderation-worker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


# --------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    """Wire the adapters into `bench` (the core never imports them) and run it."""
    from moderation_worker.model.sources import load_model_source
    from moderation_worker.tools.bench import (
        SECTIONS,
        BenchEdges,
        BenchOptions,
        run_bench,
        run_child,
        shell_command,
    )

    if args.child:  # one thread-settings variant, in a fresh process
        print(orjson.dumps(run_child(orjson.loads(args.child), load_model_source)).decode())
        return 0
    edges = BenchEdges(load_model=load_model_source)
    try:
        from adapters.tansu import TansuBroker
        from moderation_worker.settings import Settings
        from moderation_worker.tools.pipeline_bench import bench_texts, measure_pipeline
        from moderation_worker.tools.trivial_scorer import TrivialScorer

        edges.measure_pipeline, edges.broker = measure_pipeline, TansuBroker
        edges.trivial_scorer = lambda n: TrivialScorer(batch_size=n)
        edges.settings, edges.pipeline_texts = Settings, bench_texts
    except ImportError as exc:
        print(f"bench: pipeline not measured ({exc})", file=sys.stderr)
    overrides: dict[str, Any] = {"out": Path(args.out), "command": shell_command(sys.argv[1:])}
    if args.model:
        overrides["model"] = args.model
    if args.batch_sizes:
        overrides["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(","))
    if args.repeats:
        overrides["repeats"] = args.repeats
    if args.sections:
        overrides["sections"] = tuple(s for s in args.sections.split(",") if s in SECTIONS)
    options = BenchOptions.quick_defaults(**overrides) if args.quick else BenchOptions(**overrides)
    run_bench(options, edges)
    return 0


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded broker + the real worker + sample stream + summary table (tools/demo.py)."""
    from moderation_worker.tools.demo import DemoConfig, run_demo_command

    config = DemoConfig(
        input_file=Path(args.input) if args.input else None,
        ethos=Path(args.ethos) if args.ethos else None,
        limit=args.limit,
        rate=args.rate,
        with_bad_events=args.with_bad_events,
        broker=args.broker,
        model=args.model,
        lora=None if str(args.lora).lower() == "none" else args.lora,
        batch_size=args.batch_size,
        out=Path(args.out),
        timeout_s=args.timeout,
        config_file=args.config,
    )
    return run_demo_command(config)


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
    p.add_argument("--learning-rate", type=float, default=5e-4)
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
    p.set_defaults(func=cmd_calibrate)

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

    p = sub.add_parser("bench", help="speed: naive vs batched vs label head, tuning, pipeline")
    p.add_argument("--quick", action="store_true", help="tiny model, tiny counts (< 60 s)")
    p.add_argument("--model", default=None, help="model source (default gemma3-270m; quick: tiny)")
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write")
    p.add_argument("--batch-sizes", default=None, help="comma-separated, default 1,8,32,64")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")
    p.add_argument("--sections", default=None, help="subset of scoring,tuning,threads,pipeline")
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
    p.add_argument("--broker", default=None, help="a real broker URL instead of embedded Tansu")
    p.add_argument("--out", default="runs/demo/verdicts.jsonl", help="verdicts JSONL to write")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for outcomes")
    p.add_argument("--config", default=None, help="TOML settings file for the worker")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"moderation-worker {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
