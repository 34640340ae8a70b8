"""The classifier and control figures of the demo's summary, from the verdicts read back (schema
v2: `flagged`, `flagged_by`, a result per classifier, `control_version`) and the worker's policy
(`/health`'s `policy`) before and after the live change.

Every figure counts verdicts, never guesses: a classifier's "scored" is the verdicts that carry
its result, "flagged" the results that met their threshold; a shadow classifier's flags are
counted apart, and `shadow_figures` checks on every verdict that none of them decided anything.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from moderation_worker.settings import DEFAULT_LORA
from moderation_worker.tools.demo.live_change import AppliedChange

Verdicts = Sequence[Mapping[str, Any]]
NO_COMMUNITY = "(none)"


def flagged(verdict: Mapping[str, Any]) -> bool:
    """The decision: `flagged` (schema v2), or `hateful` in a version-1 verdict."""
    return bool(verdict.get("flagged", verdict.get("hateful")))


def _entry(policy: Mapping[str, Any], classifier: str) -> Mapping[str, Any]:
    return (policy.get("classifiers") or {}).get(classifier) or {}


def threshold_in(
    policy: Mapping[str, Any], classifier: str, community: str | None = None
) -> dict[str, Any] | None:
    """{value, source, detail} in force for `classifier` (and `community`) in a `/health` policy."""
    entry = _entry(policy, classifier)
    if not entry:
        return None
    by_community = entry.get("community_thresholds") or {}
    return (by_community.get(community) if community else None) or entry.get("threshold")


def describe_lora(spec: str | None, sha: str | None) -> str:
    """Which adapter a classifier ran, from its setting and the sha its verdicts name."""
    if sha:
        shipped = spec == DEFAULT_LORA or str(spec).startswith("shipped:")
        return f"{sha[:12]} ({'shipped' if shipped else spec})"
    if spec == DEFAULT_LORA:
        return "zero-shot (no shipped LoRA)"
    return "zero-shot"


def classifier_rows(
    verdicts: Verdicts,
    policy_before: Mapping[str, Any],
    policy_after: Mapping[str, Any],
    loras: Mapping[str, str],
) -> list[dict[str, Any]]:
    """One row per classifier: mode, LoRA, results, flags, thresholds before and after."""
    names = list(policy_after.get("classifiers") or policy_before.get("classifiers") or {})
    for verdict in verdicts:
        names += [n for n in verdict.get("classifiers") or {} if n not in names]
    rows = []
    for name in names:
        results = [v["classifiers"][name] for v in verdicts if name in (v.get("classifiers") or {})]
        before, after = _entry(policy_before, name), _entry(policy_after, name)
        mode = after.get("mode") or (results[0]["mode"] if results else "?")
        communities = sorted(
            {*before.get("community_thresholds", {}), *after.get("community_thresholds", {})}
        )
        thresholds = [
            {
                "community": community,
                "before": threshold_in(policy_before, name, community),
                "after": threshold_in(policy_after, name, community),
            }
            for community in (None, *communities)
        ]
        shas = [r.get("lora_sha256") for r in results if r.get("lora_sha256")]
        rows.append(
            {
                "name": name,
                "mode": mode,
                "lora": loras.get(name),
                "lora_sha256": shas[0] if shas else None,
                "scored": len(results),
                "flagged": sum(bool(r.get("flagged")) for r in results),
                "in_flagged_by": sum(name in (v.get("flagged_by") or ()) for v in verdicts),
                "thresholds": thresholds,
            }
        )
    return rows


def _value(entry: Mapping[str, Any] | None) -> str:
    return "?" if not entry else f"{entry['value']:.3f} ({entry['source']})"


def describe_thresholds(row: Mapping[str, Any]) -> str:
    """`0.796 (model); gaming 0.796 (model) -> 0.990 (control)`: what changed, and where."""
    parts = []
    for entry in row["thresholds"]:
        before, after = _value(entry["before"]), _value(entry["after"])
        text = before if before == after else f"{before} -> {after}"
        parts.append(text if entry["community"] is None else f"{entry['community']} {text}")
    return "; ".join(parts)


def shadow_figures(verdicts: Verdicts) -> dict[str, Any]:
    """Shadow results apart: how many, how many flagged, and that none of them decided.

    `in_flagged_by` counts verdicts naming a shadow classifier in `flagged_by` and
    `decided_alone` verdicts `flagged` with no enforced flag: both must be 0.
    """
    results = flags = in_flagged_by = decided_alone = only_shadow = 0
    for verdict in verdicts:
        items = (verdict.get("classifiers") or {}).items()
        shadow = {n for n, r in items if r.get("mode") == "shadow"}
        enforced_flag = any(r.get("flagged") for _, r in items if r.get("mode") == "enforce")
        shadow_flag = any(r.get("flagged") for n, r in items if n in shadow)
        results += len(shadow)
        flags += sum(bool(r.get("flagged")) for n, r in items if n in shadow)
        in_flagged_by += bool(shadow & set(verdict.get("flagged_by") or ()))
        decided_alone += flagged(verdict) and not enforced_flag
        only_shadow += shadow_flag and not enforced_flag
    return {
        "results": results,
        "flagged": flags,
        "in_flagged_by": in_flagged_by,
        "decided_alone": decided_alone,
        "only_shadow_flagged": only_shadow,
    }


def community_counts(verdicts: Verdicts) -> dict[str, int]:
    counts = Counter(v.get("community") or NO_COMMUNITY for v in verdicts)
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == NO_COMMUNITY, kv[0])))


def control_figures(verdicts: Verdicts, live: AppliedChange | None) -> dict[str, Any]:
    """Verdicts (and flags) per control version and, after a live change, the decisions it made.

    A decision "changed" when a verdict decided under the new version, in the change's scope,
    would have gone the other way under the threshold in force before: for the classifier's
    own result (`changed_results`) and for the comment's `flagged` (`changed_verdicts`).
    """
    by_version: Counter[str] = Counter(str(v.get("control_version")) for v in verdicts)
    flagged_by_version: Counter[str] = Counter(
        str(v.get("control_version")) for v in verdicts if flagged(v)
    )
    out: dict[str, Any] = {
        "verdicts_by_version": dict(sorted(by_version.items())),
        "flagged_by_version": {k: flagged_by_version.get(k, 0) for k in sorted(by_version)},
        "change": None,
    }
    if live is None:
        return out
    in_scope = newly = no_longer = changed_verdicts = 0
    for verdict in verdicts:
        result = (verdict.get("classifiers") or {}).get(live.classifier)
        community = verdict.get("community")
        if verdict.get("control_version") != live.version_after or result is None:
            continue
        if live.community is not None and community != live.community:
            continue
        old = threshold_in(live.policy_before, live.classifier, community)
        if old is None:
            continue
        in_scope += 1
        was = bool(result["p"] >= old["value"])
        newly += result["flagged"] and not was
        no_longer += was and not result["flagged"]
        if result.get("mode") == "enforce":
            others = any(
                r.get("flagged") and r.get("mode") == "enforce"
                for n, r in verdict["classifiers"].items()
                if n != live.classifier
            )
            changed_verdicts += (others or was) != flagged(verdict)
    out["change"] = {
        **{k: v for k, v in live.to_dict().items() if not k.startswith("policy_")},
        "threshold_before": threshold_in(live.policy_before, live.classifier, live.community),
        "results_in_scope": in_scope,
        "newly_flagged": newly,
        "no_longer_flagged": no_longer,
        "changed_verdicts": changed_verdicts,
    }
    return out
