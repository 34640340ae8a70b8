"""The CLI's commands: each parses nothing, takes the parsed arguments, and calls the library.

`moderation_worker.cli` builds the argument parser and dispatches here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from moderation_worker.settings import SettingsError, load_settings


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
    from moderation_worker.model.sources import load_model_source
    from moderation_worker.model.training import TrainingConfig, train_classifier
    from moderation_worker.tools.data import balanced_subset, load_splits
    from moderation_worker.tools.evaluation import evaluate

    splits = load_splits(args.data, args.validation_rows, args.seed)
    if args.model.startswith("encoder:"):
        from moderation_worker.tools.encoder_commands import train_encoder_command

        return train_encoder_command(args, splits)
    train = (
        splits.train if args.train_rows is None else splits.train.take(slice(0, args.train_rows))
    )
    if args.negatives_per_positive is not None:
        train = balanced_subset(train, args.negatives_per_positive, args.seed)
    print(
        f"data: {len(train)} train / {len(splits.validation)} validation / {len(splits.test)} "
        f"test rows from {args.data} (sha256 {(train.sha256 or '')[:12]})",
        file=sys.stderr,
    )
    prompt = _prompt_from_args(args)
    if len(prompt.labels) != 2:
        raise SystemExit("train: the ETHOS/CSV loaders give binary labels; use exactly two labels")
    config = TrainingConfig(
        rank=args.rank,
        learning_rate=args.learning_rate or 5e-4,
        batch_size=args.train_batch_size,
        epochs=args.epochs,
        seed=args.seed,
        loss=args.loss,
        balance_classes=args.balance,
        target_layers=tuple(args.target_layers.split(",")),
    )

    def report(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
        metrics = evaluate(y, p, threshold)
        metrics.pop("roc_curve", None)  # the curve belongs in reports, not in the metadata
        return metrics

    trained = train_classifier(
        load_model_source(args.model),
        train.texts,
        train.labels,
        splits.validation.texts,
        splits.validation.labels,
        prompt=prompt,
        config=config,
        policy=args.policy,
        out=args.out,
        data_sha256=train.sha256,
        notes={"data": str(args.data), "negatives_per_positive": args.negatives_per_positive},
        validation_report=report,
        batch_size=args.batch_size,
        progress=True,
    )
    result, adapter = trained.training, trained.adapter
    print(
        f"trained in {result.seconds:.0f}s, {result.trainable_parameters} LoRA parameters; "
        f"wrote {adapter.path} and its .lora.json",
        file=sys.stderr,
    )
    _print_json(trained.summary())
    return 0


# --------------------------------------------------------------------------- calibrate
def cmd_calibrate(args: argparse.Namespace) -> int:
    from moderation_worker.model.training import calibrate_threshold
    from moderation_worker.threshold_source import write_threshold_file
    from moderation_worker.tools.data import load_splits

    splits = load_splits(args.data, args.validation_rows, args.seed)
    clf = _classifier(args)
    validation = splits.validation
    choice = calibrate_threshold(clf, validation.texts, validation.labels, args.policy, True)
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
    from moderation_worker.tools.score import JsonLinesSink, score_lines

    clf = _classifier(args, threshold=args.threshold)
    name = "stdin" if args.input in (None, "-") else str(args.input)
    stream = sys.stdin.buffer if name == "stdin" else open(args.input, "rb")
    sink = JsonLinesSink(sys.stdout.buffer, sys.stderr.buffer)
    with stream:
        counts = score_lines(
            stream, clf, clf.threshold, sink, source_name=name, max_text_chars=args.max_text_chars
        )
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
    from moderation_worker.model import compile_cache

    settings = _settings(args)  # cache on before any backend import: TF reads XLA flags once
    compile_cache.enable(settings.speed.compile_cache_dir)
    from adapters.delivery_guard import DeliveryConfigError
    from adapters.moderation import Moderation
    from moderation_worker.model.prompts import PromptSettings
    from moderation_worker.model.sources import build_classifier, build_classifier_set

    def factory():
        if settings.classifiers:  # several classifiers on one base model, per-row LoRA
            return build_classifier_set(
                settings.model,
                {c.name: c.lora for c in settings.classifiers},
                batch_size=settings.batch_size,
                length_buckets=settings.length_buckets,
                spare_slots=settings.spare_classifier_slots,
                prefix_cache=settings.speed.prefix_cache,
            )
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
            prefix_cache=settings.speed.prefix_cache,
        )

    # SIGHUP re-reads the config file and environment, so a threshold edited in either
    # takes effect without reloading the model.
    moderation = Moderation(settings, factory, reload_settings=lambda: load_settings(args.config))
    try:
        moderation.run()  # Faust's env vars weakening delivery: refused before the model loads
    except DeliveryConfigError as exc:
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
        bench_loader,
        quick_out_path,
        run_bench,
        run_child,
        shell_command,
    )

    if args.child:  # one thread-settings variant, in a fresh process
        print(orjson.dumps(run_child(orjson.loads(args.child), load_model_source)).decode())
        return 0
    edges = BenchEdges(load_model=bench_loader(load_model_source))  # + `random:` specs
    try:
        from adapters.tansu import TansuBroker
        from moderation_worker.settings import Settings
        from moderation_worker.tools.cold_start import measure_cold_start
        from moderation_worker.tools.pipeline_bench import bench_texts, measure_pipeline
        from moderation_worker.tools.trivial_scorer import TrivialScorer

        edges.measure_pipeline, edges.broker = measure_pipeline, TansuBroker
        edges.trivial_scorer = lambda n: TrivialScorer(batch_size=n)
        edges.settings, edges.pipeline_texts = Settings, bench_texts
        edges.cold_start = measure_cold_start
    except ImportError as exc:
        print(f"bench: pipeline not measured ({exc})", file=sys.stderr)
    overrides: dict[str, Any] = {"command": shell_command(sys.argv[1:])}
    if args.out:  # else BENCHMARKS.md, or a temporary file for --quick (never the real table)
        overrides["out"] = Path(args.out)
    if args.model and args.model.startswith("encoder:"):
        print(
            "bench: its sections measure the Gemma scoring paths (label head, per-row LoRA, "
            "prefix cache); measure an encoder beside the Gemma classifiers, on the same texts, "
            "with `moderation-worker cost --entry enc=encoder:PREFIX --entry …`",
            file=sys.stderr,
        )
        return 2
    if args.model:
        overrides["model"] = args.model
    if args.batch_sizes:
        overrides["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(","))
    if args.repeats:
        overrides["repeats"] = args.repeats
    if getattr(args, "peer_texts", None):
        overrides["peer_texts"] = args.peer_texts
    if args.sections:
        overrides["sections"] = tuple(s for s in args.sections.split(",") if s in SECTIONS)
        if not args.out and set(overrides["sections"]) != set(BenchOptions().sections):
            overrides["out"] = quick_out_path()  # a partial run never replaces the full table
    options = BenchOptions.quick_defaults(**overrides) if args.quick else BenchOptions(**overrides)
    run_bench(options, edges)
    return 0


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded broker + the real worker + sample stream + summary table (tools/demo/)."""
    from moderation_worker.tools.demo import DemoConfig, LiveChange, run_demo_command

    config = DemoConfig(
        input_file=Path(args.input) if args.input else None,
        ethos=Path(args.ethos) if args.ethos else None,
        limit=args.limit,
        rate=args.rate,
        with_bad_events=args.with_bad_events,
        live_change=LiveChange() if args.live_change else None,
        broker=args.broker,
        model=args.model,
        lora=None if str(args.lora).lower() == "none" else args.lora,
        batch_size=args.batch_size,
        out=Path(args.out),
        timeout_s=args.timeout,
        config_file=args.config,
    )
    code = run_demo_command(config)
    if code == 0:
        print(
            "\nWatch it live and tune it: `moderation-worker console --config worker.toml` serves "
            "the moderator console (stream, operating point, review queue) on your cluster; "
            "with `demo --broker URL` it shows the demo's stream (README, 'The moderator console')."
        )
    if code == 0 and args.loop:
        from moderation_worker.tools.demo.loop_act import run_loop_act

        run_loop_act()
    return code
