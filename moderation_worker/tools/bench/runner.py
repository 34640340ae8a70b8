"""`run_bench`: the sections in order, the table saved after each one."""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path

from moderation_worker.model.prompts import PromptEncoder, PromptSettings
from moderation_worker.tools.bench.coldstart import bench_coldstart
from moderation_worker.tools.bench.flops import (
    count_flops,
    gate_dim_reduction,
    matmul_peak,
    shaped_matmul,
)
from moderation_worker.tools.bench.gpu import bench_gpu
from moderation_worker.tools.bench.length_batching import measure_length_batching, stream_texts
from moderation_worker.tools.bench.machine import (
    OtherCpu,
    load_average,
    machine_info,
    other_load,
    versions,
)
from moderation_worker.tools.bench.options import (
    LENGTH_BUCKETS,
    BenchEdges,
    BenchOptions,
    bench_texts,
    log,
)
from moderation_worker.tools.bench.peer import bench_peer
from moderation_worker.tools.bench.pipeline import measure_pipelines, pipeline_summary
from moderation_worker.tools.bench.policies import PolicyReport, measure_policies
from moderation_worker.tools.bench.report import BenchReport, render
from moderation_worker.tools.bench.scoring import measure_scoring
from moderation_worker.tools.bench.tuning import TuningRow, measure_threads, measure_tuning


def run_bench(options: BenchOptions, edges: BenchEdges) -> BenchReport:
    """Run the selected sections; write `OUT.partial` after each one, rename it to `OUT` at the end.

    A crash keeps the sections measured so far, and never clobbers the last complete table.
    """
    started = time.perf_counter()
    machine = machine_info()
    log(f"accelerator: {machine['accelerator']}; Keras backend {machine['backend']}")
    report = BenchReport(
        options=options,
        started=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine,
        versions=versions(machine["backend"]),
        load_before=other_load(),
    )
    if report.load_before:
        log(f"WARNING: measuring under load ({report.load_before})")
    others = OtherCpu()
    out = Path(options.out)
    partial = out.with_name(out.name + ".partial")  # a crash never clobbers the last good table
    log(f"writing {out} ({partial.name} until the run ends)")

    def save() -> None:
        report.seconds = time.perf_counter() - started
        report.load_after = other_load()
        report.loadavg_after = load_average()
        others.sample()
        report.other_cpu, report.other_share = others.summary(), others.share()
        partial.write_text(render(report), encoding="utf-8")
        if report.other_share > 0.05:
            log(f"WARNING: {report.other_cpu}")

    log(f"loading model {options.model}")
    model = edges.load_model(options.model)
    report.model_name = model.name
    report.model_config = model.backbone.get_config()
    encoder = PromptEncoder(model.tokenizer, PromptSettings())
    flops = count_flops(
        report.model_config,
        encoder.settings.sequence_length,
        len(encoder.label_ids),
        prefix_tokens=len(encoder.head_ids),
    )
    report.flops = flops
    log(
        f"FLOPs/comment: (a)/(b) {flops.full_vocab_path / 1e9:.2f} G, "
        f"(c) {flops.label_path / 1e9:.2f} G"
    )
    texts, report.texts_source = bench_texts(options, max(options.bucket_texts, 64))

    report.peak = matmul_peak(options.matmul_sizes)
    d = report.model_config["hidden_dim"]
    ffn = report.model_config["intermediate_dim"] // gate_dim_reduction(report.model_config)
    rows = options.tuning_batch * encoder.settings.sequence_length
    report.shaped[f"MLP-shaped matmul [{rows}×{d}]·[{d}×{ffn}] (batch {options.tuning_batch})"] = (
        shaped_matmul(rows, d, ffn)
    )
    save()

    if "scoring" in options.sections:
        report.scoring = measure_scoring(model, options, texts, flops)
        save()
    if "tuning" in options.sections:
        try:
            measure_tuning(model, options, texts, flops, report.tuning)
        except Exception as exc:  # keep the other sections' numbers
            log(f"tuning failed: {exc!r}")
            report.tuning.append(
                TuningRow("(failed)", type(exc).__name__, 0, float("nan"), None, str(exc)[:200])
            )
        save()
    if "length" in options.sections:
        stream, _ = stream_texts(options, options.length_texts)
        report.length_texts = len(stream)
        try:
            measure_length_batching(model, options, stream, LENGTH_BUCKETS, report.length)
        except Exception as exc:  # keep the other sections' numbers
            log(f"length batching failed: {exc!r}")
            report.pipeline_note = f"Length batching failed: `{exc!r}`"[:400]
        save()
    if "threads" in options.sections:
        report.threads = measure_threads(options, edges)
        save()
    if "pipeline" in options.sections:
        if edges.measure_pipeline is None:
            report.pipeline_note = "Not measured: the pipeline bench is not available."
        else:
            try:
                measure_pipelines(model, options, edges, report.pipeline)
                report.pipeline_note = pipeline_summary(report)
            except Exception as exc:  # keep the other sections' numbers
                log(f"pipeline failed: {exc!r}")
                report.pipeline_note = f"Pipeline run failed: `{exc!r}`"[:400]
        save()
    if "peer" in options.sections:  # before policies: llama.cpp has no LoRA, so zero-shot
        report.peer = bench_peer(model, options)
        save()
    if "gpu" in options.sections:
        report.gpu = bench_gpu(model, options, texts)
        save()
    if "coldstart" in options.sections:  # worker processes; this one's model sits idle
        report.coldstart = bench_coldstart(options, edges)
        save()
    if "policies" in options.sections:  # last: it enables LoRA on the shared backbone
        report.policies = PolicyReport()
        try:
            measure_policies(model, options, texts, report.policies)
        except Exception as exc:  # keep the other sections' numbers
            log(f"policies failed: {exc!r}")
            report.policies.note = f"Policies run failed: `{exc!r}`"[:400]
        save()
    others.stop()
    save()
    partial.replace(out)
    log(f"wrote {options.out} in {report.seconds:.0f} s")
    return report
