"""What the learner decides, free of Kafka: when a classifier trains, what its candidate's
control records are, when a candidate is promoted or withdrawn, and what a rollback writes.

The learner process (`adapters/learner.py`) feeds it labels and the fleet's `PolicyState`, and
publishes the control records it returns. Its memory is the `LabelStore`: labels, a small state
per classifier (the last cycle, the candidate waiting in shadow) and an append-only history of
cycles, promotions, withdrawals and rollbacks, so a restarted learner carries on.

A candidate's life: trained (`cycle`) -> published as `candidate/<c>` and scored in shadow by
every worker for `shadow_s` -> then, by `tick`, promoted (`adapter/<c>` with its sha256 and
threshold, by "learner") when the held-out comparison said so and `auto_promote` is on, or
withdrawn (a tombstone) when it lost. A person can promote a waiting candidate at any time
(`control promote`), and roll a promotion back (`control rollback`): one record each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moderation_worker.control_records import (
    Record,
    record_for_adapter,
    record_for_candidate,
    tombstone,
)
from moderation_worker.loop.store import LabelStore
from moderation_worker.loop_settings import LoopSettings
from moderation_worker.model.classifier import LoadedModel
from moderation_worker.model.lora import LoraAdapter
from moderation_worker.model.prompts import PromptSettings
from moderation_worker.policy import PolicyState
from moderation_worker.tools.learning.cycle import CycleResult, Production, run_cycle

LEARNER = "learner"


class LoopCoordinator:
    """The agile loop's decisions for every configured classifier.

    Args:
        settings: the `[loop]` settings.
        store: labels, state and history (a shared directory).
        base: the base model the workers run (the candidate is trained on it).
        configured: classifier -> its configured adapter (None: zero-shot).
        policy: returns the fleet's `PolicyState` now (settings + control topic).
        resolve: a control record's `lora` -> a loaded adapter, its sha256 checked.
        zero_shot_prompt: the prompt of a classifier without an adapter.
        clock: seconds (time.time), replaceable in tests.
    """

    def __init__(
        self,
        settings: LoopSettings,
        store: LabelStore,
        base: LoadedModel,
        configured: Mapping[str, LoraAdapter | None],
        policy: Callable[[], PolicyState],
        resolve: Callable[[str, str | None], LoraAdapter | None],
        zero_shot_prompt: PromptSettings | None = None,
        clock: Callable[[], float] = time.time,
        log: Callable[[str], None] = print,
    ) -> None:
        self.settings, self.store, self.base = settings, store, base
        self.configured = dict(configured)
        self.policy, self.resolve, self.clock, self.log = policy, resolve, clock, log
        self.zero_shot_prompt = zero_shot_prompt or PromptSettings()

    # ------------------------------------------------------------------ when to train
    def due(self, classifier: str, force: bool = False) -> str | None:
        """Why `classifier` should train now, or None: enough new labels, or the schedule."""
        state = self.store.state(classifier)
        new = self.store.last_seq(classifier) - int(state.get("last_cycle_seq", 0))
        if new <= 0:
            return "forced, no new labels" if force else None
        if force:
            return f"forced ({new} new labels)"
        if new >= self.settings.min_new_labels:
            return f"{new} new labels (>= {self.settings.min_new_labels})"
        last = float(state.get("last_cycle_at", 0.0))
        interval = self.settings.max_interval_s
        if interval is not None and last and self.clock() - last >= interval:
            return f"{new} new labels and {interval:.0f} s since the last cycle"
        return None

    def production(self, classifier: str) -> Production:
        """The adapter, prompt and threshold the fleet enforces for `classifier` now."""
        state = self.policy()
        spec = state.control_adapters.get(classifier)
        if spec:
            adapter = self.resolve(str(spec["lora"]), spec.get("sha256"))
            source = f"adapter/{classifier} (control)"
        else:
            adapter, source = self.configured[classifier], "configured"
        prompt = adapter.metadata.prompt if adapter is not None else self.zero_shot_prompt
        threshold = state.threshold(classifier).value
        return Production(adapter, prompt, float(threshold), source)

    # ------------------------------------------------------------------ a cycle
    def cycle(self, classifier: str, reason: str) -> tuple[CycleResult, list[Record]]:
        """Train and judge a candidate (under the store's training lock); returns the result
        and the records to publish: the candidate, in shadow, or nothing when it was skipped."""
        with self.store.training_lock(classifier):
            production = self.production(classifier)
            labels = self.store.latest(classifier)
            state = self.store.state(classifier)
            self.log(f"{classifier}: cycle starts ({reason}); production is {production.source}")
            result = run_cycle(
                self.base,
                classifier,
                labels,
                production,
                self.settings,
                self.store.adapters_dir,
                trusted_seq=int(state.get("last_cycle_seq", 0)),
                log=self.log,
            )
        result.extra["reason"] = reason
        result.extra["production"] = {
            "source": production.source,
            "sha256": production.adapter.sha256 if production.adapter else None,
            "threshold": production.threshold,
        }
        state = {**state, "last_cycle_seq": result.last_seq, "last_cycle_at": self.clock()}
        records: list[Record] = []
        if result.candidate is not None and result.decision is not None:
            summary = result.decision.reason
            records.append(
                record_for_candidate(
                    classifier,
                    str(result.candidate.path),
                    str(result.candidate.sha256),
                    float(result.threshold or 0.5),
                    by=LEARNER,
                    reason=summary[:2000],
                )
            )
            state["pending"] = {
                "lora": str(result.candidate.path),
                "sha256": result.candidate.sha256,
                "threshold": result.threshold,
                "promote": result.decision.promote,
                "reason": summary,
                "holdout": result.holdout.to_dict() if result.holdout else None,
                "decide_at": self.clock() + self.settings.shadow_s,
            }
        self.store.save_state(classifier, state)
        self.store.record_event(classifier, {"event": "cycle", **result.to_dict()})
        return result, records

    # ------------------------------------------------------------------ after the shadow time
    def tick(self) -> list[Record]:
        """Promote or withdraw each candidate whose shadow time is over."""
        records: list[Record] = []
        for classifier in self.configured:
            pending = self.store.state(classifier).get("pending")
            if not pending or self.clock() < float(pending["decide_at"]):
                continue
            if pending["promote"] and self.settings.auto_promote:
                records += self.promote(classifier, by=LEARNER)
            elif not pending["promote"]:
                records += self.withdraw(classifier, pending["reason"])
        return records

    def promote(self, classifier: str, by: str, reason: str | None = None) -> list[Record]:
        previous = self.policy().control_adapters.get(classifier)
        return promote(self.store, classifier, by, previous, reason, self.log)

    def withdraw(self, classifier: str, reason: str, by: str = LEARNER) -> list[Record]:
        return withdraw(self.store, classifier, reason, by, self.log)


def promote(
    store: LabelStore,
    classifier: str,
    by: str,
    previous: Mapping[str, Any] | None,
    reason: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Record]:
    """The waiting candidate becomes production: `adapter/<c>` (the one record that decides),
    then the candidate key is cleared. Recorded with who, the metrics, the sha256 and the
    adapter it replaced (`previous`: the `adapter/` override in force, None = configured)."""
    state = store.state(classifier)
    pending = state.get("pending")
    if not pending:
        raise LookupError(f"{classifier}: no candidate is waiting")
    why = reason or pending["reason"]
    records = [
        record_for_adapter(
            classifier,
            pending["lora"],
            pending["sha256"],
            by=by,
            reason=f"promoted: {why}"[:2000],
            threshold=pending["threshold"],
        ),
        tombstone(f"candidate/{classifier}"),
    ]
    store.record_event(
        classifier,
        {
            "event": "promotion",
            "by": by,
            "lora": pending["lora"],
            "sha256": pending["sha256"],
            "threshold": pending["threshold"],
            "holdout": pending.get("holdout"),
            "reason": why,
            "previous": dict(previous) if previous else None,
        },
    )
    store.save_state(classifier, {**state, "pending": None})
    log(f"{classifier}: promoted {Path(pending['lora']).name} (by {by})")
    return records


def withdraw(
    store: LabelStore,
    classifier: str,
    reason: str,
    by: str = LEARNER,
    log: Callable[[str], None] = print,
) -> list[Record]:
    """The waiting candidate is dropped (a tombstone of `candidate/<c>`), and so recorded."""
    state = store.state(classifier)
    pending = state.get("pending") or {}
    store.record_event(
        classifier,
        {"event": "withdrawn", "by": by, "sha256": pending.get("sha256"), "reason": reason},
    )
    store.save_state(classifier, {**state, "pending": None})
    log(f"{classifier}: candidate withdrawn ({reason})")
    return [tombstone(f"candidate/{classifier}")]


def rollback_record(history: list[dict[str, Any]], classifier: str, by: str) -> Record:
    """One record that puts back what the last promotion replaced: the previous `adapter/`
    override, or (a tombstone) the configured adapter."""
    promotions = [e for e in history if e.get("event") == "promotion"]
    if not promotions:
        raise LookupError(f"{classifier}: no promotion to roll back")
    last = promotions[-1]
    previous = last.get("previous")
    reason = f"rollback of {last.get('sha256', '?')[:12]} promoted by {last.get('by')}"
    if not previous:
        return tombstone(f"adapter/{classifier}")
    return record_for_adapter(
        classifier,
        str(previous["lora"]),
        previous.get("sha256"),
        by=by,
        reason=reason,
        threshold=previous.get("threshold"),
    )
