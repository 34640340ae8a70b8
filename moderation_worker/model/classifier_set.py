"""`ClassifierSet`: several agile classifiers on one base model, scored in one pass per batch.

Each classifier is a LoRA adapter (or none: zero-shot) with its own prompt and label tokens.
A batch holds rows of any classifiers; every row is encoded with its classifier's prompt, runs
through the shared backbone with its own adapter (`multi_lora`), and is read at its own label
tokens. So the backbone's weights are in memory once, a batch has one fixed shape whatever its
mix, and adding a classifier adds its factors to the stack, not a model or a graph.

Example:
    >>> base = load_model_source("gemma3-270m")
    >>> rules = ClassifierSet(base, {"hate": hate, "violence": violence}, batch_size=8)
    >>> rules.p_positive(["you people are vermin", "nice goal"], ["hate", "violence"])
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moderation_worker.control_records import CANDIDATE_SUFFIX
from moderation_worker.events import ModelIdentity
from moderation_worker.model.classifier import LoadedModel, _text_in_bucket, bucket_for
from moderation_worker.model.lora import DEFAULT_TARGET_LAYERS, LoraAdapter
from moderation_worker.model.multi_lora import AdapterStack, MultiLoraModel, rows_using
from moderation_worker.model.prefix_cache import PrefixCache, common_prefix
from moderation_worker.model.prefix_cache import supports as prefix_cache_supports
from moderation_worker.model.prompts import EncodedBatch, PromptEncoder, PromptSettings


@dataclass(frozen=True)
class Member:
    """One classifier of a set: its stack slot, prompt, label columns and identity."""

    name: str
    slot: int
    adapter: LoraAdapter | None
    encoder: PromptEncoder
    columns: tuple[int, ...]  # its labels' positions in the set's label-token union
    identity: ModelIdentity

    @property
    def prompt(self) -> PromptSettings:
        return self.encoder.settings

    @property
    def calibrated_threshold(self) -> float | None:
        return self.adapter.metadata.threshold if self.adapter is not None else None


class ClassifierSet:
    """Named classifiers sharing one backbone; rows of any mix scored in one call per batch.

    Args:
        model: the base model; its backbone's weights are shared by every classifier.
        adapters: name -> `LoraAdapter` (its prompt comes from its metadata), or None for a
            zero-shot classifier with `prompt`.
        batch_size: rows per model call; every call has exactly this shape.
        jit_compile: XLA-compile the forward pass (see `AgileClassifier`).
        length_buckets: shorter sequence lengths a batch may be cut to (exact).
        spare_slots: room for classifiers added later (`add`) without a new stack.
        spare_rank: the LoRA rank the stack holds at least, so an adapter added later (a
            candidate of the agile loop, rank 4 like the codelab's) fits a zero-shot set.
        prompt: the prompt of zero-shot classifiers.
        resolve: turns a LoRA spec of a control-topic override (`"shipped:violence"`, a path)
            into a weights path; default: the spec is a path.
        prefix_cache: compute the prompt head every member shares (their heads' common
            start) once per adapter slot, recomputed when a slot's adapter changes. Exact.
    """

    def __init__(
        self,
        model: LoadedModel,
        adapters: Mapping[str, LoraAdapter | None],
        batch_size: int = 8,
        jit_compile: bool | str = True,
        length_buckets: Sequence[int] | None = None,
        spare_slots: int = 2,
        spare_rank: int = 4,
        prompt: PromptSettings | None = None,
        resolve: Callable[[str], Path | None] | None = None,
        prefix_cache: bool = True,
    ) -> None:
        if not adapters:
            raise ValueError("a classifier set needs at least one classifier")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.base = model
        self.batch_size = batch_size
        self.jit_compile = jit_compile
        self._zero_shot_prompt = prompt or PromptSettings()
        given = [a for a in adapters.values() if a is not None]
        for adapter in given:
            adapter.check_base_model(model.name)
        targets = sorted({t for a in given for t in a.target_layers} or DEFAULT_TARGET_LAYERS)
        rank = max([a.rank for a in given] + [spare_rank if spare_slots else 1])
        self.stack = AdapterStack(
            model.backbone, len(adapters) + 1 + spare_slots, rank, tuple(targets)
        )
        self.members: dict[str, Member] = {}
        self.label_ids: list[int] = []
        self._model: MultiLoraModel | None = None
        self._prefix_cache = prefix_cache and prefix_cache_supports(model.backbone)
        self._prefix: PrefixCache | None = None
        self._configured = dict(adapters)
        self._resolve = resolve or Path
        self._overrides: dict[str, tuple[str, str | None]] = {}  # name -> (lora, sha256) loaded
        self._failed: set[tuple[str, str, str | None]] = set()
        first = next(iter(adapters.values()))
        length = (
            first.metadata.prompt.sequence_length
            if first
            else self._zero_shot_prompt.sequence_length
        )
        self.sequence_length = length
        for name, adapter in adapters.items():
            self.add(name, adapter)
        self.length_buckets = tuple(sorted({int(b) for b in (length_buckets or ()) if b < length}))
        self.length_buckets += (length,)

    # ------------------------------------------------------------------ membership
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.members)

    def add(self, name: str, adapter: LoraAdapter | None) -> Member:
        """Add (or replace) a classifier while the set serves: its factors go into a free
        slot (or its old one). New label tokens mean one new compiled graph per shape."""
        old = self.members.get(name)
        used = {m.slot for m in self.members.values() if m.name != name}
        slot = (
            old.slot
            if old is not None
            else next((s for s in range(1, self.stack.capacity) if s not in used), None)
        )
        if slot is None:
            raise ValueError(
                f"no free adapter slot for {name!r} (capacity {self.stack.capacity - 1}); "
                "raise spare_classifier_slots and restart"
            )
        if adapter is not None:
            adapter.check_base_model(self.base.name)
        prompt = adapter.metadata.prompt if adapter is not None else self._zero_shot_prompt
        if prompt.sequence_length != self.sequence_length:
            raise ValueError(
                f"{name}: sequence_length {prompt.sequence_length} differs from the set's "
                f"{self.sequence_length}; classifiers of one set share the batch shape"
            )
        encoder = PromptEncoder(self.base.tokenizer, prompt)  # checks single-token labels
        new_ids = [i for i in encoder.label_ids if i not in self.label_ids]
        heads = [m.encoder.head_ids for m in self.members.values() if m.name != name]
        prefix = common_prefix([*heads, encoder.head_ids]) if self._prefix_cache else []
        new_prefix = self._prefix_cache and (
            self._prefix is None or self._prefix.prefix_ids != prefix
        )
        if new_ids or new_prefix or self._model is None:
            self.label_ids.extend(new_ids)
            if new_prefix:
                self._prefix = PrefixCache(self.base.backbone, prefix, self.stack.capacity)
            self._model = MultiLoraModel(
                self.base.backbone, self.stack, self.label_ids, self._prefix
            )
            self._model.compile(jit_compile=self.jit_compile)
        self.stack.put(slot, adapter)  # None writes zeros: a zero-shot row
        columns = tuple(self.label_ids.index(i) for i in encoder.label_ids)
        identity = ModelIdentity(
            base_model=self.base.name, lora_sha256=adapter.sha256 if adapter else None
        )
        member = Member(name, slot, adapter, encoder, columns, identity)
        self.members[name] = member
        slots = [m.slot for m in self.members.values()] if new_prefix else [slot]
        for each in slots:  # this slot's head keys/values (every slot's, for a new head)
            self._refresh_prefix(each)
        return member

    def _refresh_prefix(self, slot: int) -> None:
        if self._prefix is not None:
            rows = np.asarray([slot], dtype=np.int32)
            self._prefix.refresh(slot, lambda: rows_using(self.stack, rows))

    def apply_overrides(self, overrides: Mapping[str, Mapping[str, str]]) -> list[str]:
        """Give each classifier the adapter a control record names (`{"lora", "sha256"}`), or
        its configured one when the record is gone. Called at a batch boundary; returns one
        message per change or failure. A file that cannot be loaded, or whose sha256 differs,
        leaves the classifier on its current adapter (retried only when the record changes)."""
        messages = []
        for name in self._configured:
            spec = overrides.get(name)
            wanted = (spec["lora"], spec.get("sha256")) if spec else None
            if wanted == self._overrides.get(name):
                continue
            if wanted is None:
                self.add(name, self._configured[name])
                del self._overrides[name]
                messages.append(f"{name}: back to its configured adapter")
                continue
            if (name, *wanted) in self._failed:
                continue
            try:
                adapter = self._load(*wanted)
                self.add(name, adapter)
            except Exception as exc:  # a bad file must not stop the worker; say why
                self._failed.add((name, *wanted))
                messages.append(
                    f"{name}: adapter {wanted[0]!r} not loaded ({exc}); kept the old one"
                )
                continue
            self._overrides[name] = wanted
            messages.append(
                f"{name}: now adapter {wanted[0]!r} (sha256 {adapter.sha256 if adapter else None})"
            )
        return messages

    def apply_candidates(self, candidates: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Load each classifier's candidate (`{"lora", "sha256"}`, sha256 required) as member
        `<name>@candidate` in a spare slot, and drop candidates no longer wanted. A candidate
        that cannot be loaded is left out (its rows are not scored), with a message."""
        messages = []
        for base, spec in candidates.items():
            name, wanted = base + CANDIDATE_SUFFIX, (spec["lora"], spec.get("sha256"))
            if base not in self._configured or self._overrides.get(name) == wanted:
                continue
            if (name, *wanted) in self._failed:
                continue
            try:
                if not wanted[1]:
                    raise ValueError("a candidate needs its sha256")
                self.add(name, self._load(*wanted))
            except Exception as exc:  # a bad file must not stop the worker; say why
                self._failed.add((name, *wanted))
                messages.append(f"{name}: candidate {wanted[0]!r} not loaded ({exc})")
                continue
            self._overrides[name] = wanted
            messages.append(f"{name}: scoring candidate {wanted[0]!r} in shadow")
        for name in [n for n in self.members if n.endswith(CANDIDATE_SUFFIX)]:
            if name.removesuffix(CANDIDATE_SUFFIX) not in candidates:
                self.remove(name)
                self._overrides.pop(name, None)
                messages.append(f"{name}: candidate withdrawn")
        return messages

    def remove(self, name: str) -> None:
        """Drop a classifier added while serving; its slot is zeroed and free again."""
        if name in self._configured:
            raise ValueError(f"{name!r} is configured; it can be replaced, not removed")
        member = self._member(name)
        self.stack.put(member.slot, None)
        del self.members[name]

    def _load(self, lora: str, sha256: str | None) -> LoraAdapter | None:
        """An adapter named by a control record, its sha256 checked before it is used."""
        path = self._resolve(lora)
        adapter = LoraAdapter.load(path, base_model=self.base.name) if path else None
        if sha256 and (adapter is None or adapter.sha256 != sha256):
            got = adapter.sha256 if adapter else None
            raise ValueError(f"sha256 of {lora} is {got}, the record says {sha256}")
        return adapter

    # ------------------------------------------------------------------ scoring
    def encode(self, texts: Sequence[str], names: Sequence[str]) -> tuple[EncodedBatch, np.ndarray]:
        """Rows padded to `batch_size`, each with its own classifier's prompt, and each row's
        adapter slot (padding rows: slot 0, the identity)."""
        n = len(texts)
        if n != len(names) or n > self.batch_size:
            raise ValueError(f"{n} texts, {len(names)} names, batch size {self.batch_size}")
        first = next(iter(self.members.values())).encoder
        batch = first.encode([], batch_size=self.batch_size)  # BOS-only padding rows
        slots = np.zeros((self.batch_size,), dtype=np.int32)
        for name in dict.fromkeys(names):
            member = self._member(name)
            rows = [i for i, row_name in enumerate(names) if row_name == name]
            part = member.encoder.encode([texts[i] for i in rows])
            batch.token_ids[rows] = part.token_ids
            batch.padding_mask[rows] = part.padding_mask
            batch.last_index[rows] = part.last_index
            batch.truncated[rows] = part.truncated
            slots[rows] = member.slot
        return batch, slots

    def length_bucket(self, text: str) -> int:
        """The compiled length `text` needs under the longest prompt of the set (its rows
        may go to any classifier the route names)."""
        encoders = {m.prompt: m.encoder for m in self.members.values()}.values()
        longest = max(len(e.encode_ids(text)[0]) for e in encoders)
        return bucket_for(longest, self.length_buckets)

    def _member(self, name: str) -> Member:
        member = self.members.get(name)
        if member is None:
            raise KeyError(f"no classifier named {name!r} (have {', '.join(self.members)})")
        return member

    def predict_rows(self, texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
        """`[p(not positive), p(positive)]` per row, float32 `[n, 2]`; n <= batch_size."""
        batch, slots = self.encode(texts, names)
        if len(self.length_buckets) > 1:
            batch = batch.cut_to(self.length_buckets)
        inputs = {**batch.as_inputs(), "adapter_index": slots}
        logits = np.asarray(self._model.predict_on_batch(inputs), dtype=np.float64)
        out = np.zeros((len(texts), 2), dtype=np.float32)
        for i, name in enumerate(names):
            member = self.members[name]
            z = logits[i, list(member.columns)]
            z = np.exp(z - z.max())
            p = z[member.prompt.positive_index] / z.sum()
            out[i] = (1.0 - p, p)
        return out

    def p_positive(
        self, texts: Sequence[str], names: Sequence[str], progress: bool = False
    ) -> np.ndarray:
        """p(positive label) for each (text, classifier) row, any number of rows."""
        out = np.zeros((len(texts),), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="scoring", unit="batch", file=sys.stderr)
        for start in starts:
            end = start + self.batch_size
            out[start:end] = self.predict_rows(texts[start:end], names[start:end])[:, 1]
        return out

    def identity_of(self, name: str) -> ModelIdentity:
        return self._member(name).identity

    def labels_of(self, name: str) -> tuple[str, str]:
        """(a negative label, the positive label) of one classifier, for verdict labels."""
        prompt = self._member(name).prompt
        return next(
            lb for lb in prompt.labels if lb != prompt.positive_label
        ), prompt.positive_label

    def calibrated_thresholds(self) -> dict[str, float | None]:
        """Each classifier's threshold calibrated into its LoRA metadata (the policy's fallback)."""
        return {name: m.calibrated_threshold for name, m in self.members.items()}

    def canary_rows(self) -> list[tuple[str, str]]:
        """One harmless (text, classifier) row per compiled shape, shortest first."""
        first = next(iter(self.members.values()))
        rows: list[tuple[str, str]] = []
        lower = 0
        for bucket in self.length_buckets:
            text = _text_in_bucket(first.encoder, lower, bucket)
            if text is not None:
                rows.append((text, first.name))
            lower = bucket
        return rows or [("hello", first.name)]
