"""Eval-gated promotion: the rule that decides whether a version may become ``production``.

A version is promoted only if it keeps at least ``min_retention`` of the probe facts the base states
(adapterfab/retention.py; a version on whose probes the base states nothing, or one measured without
them, is not held back by it and the decision says so) **and** its eval metric beats **both** the base
model (measured by the same worker on the same eval rows, with the adapter disabled) **and** the current
production version (its recorded metric) by more than a margin: ``max(margin, relative_margin *
|reference|)``. Every decision,
promoted or refused, is returned as a ``Decision`` whose ``tags()`` are written on the version, so
``registry show`` says why a version is (not) in production. Pure logic: no MLflow here (``gate_decision``
reads the registry it is given).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from adapterfab import retention

# metric -> goal; each metric is also measured on the base model as ``base_<metric>``
GOALS: dict[str, str] = {"eval_loss": "min", "eval_token_accuracy": "max"}
PROMOTED, REFUSED, ROLLED_BACK = "promoted", "refused", "rolled_back"


@dataclass(frozen=True)
class Policy:
    metric: str = "eval_loss"
    margin: float = 0.0  # absolute improvement required over each reference
    relative_margin: float = 0.0  # improvement required as a fraction of each reference
    min_retention: float = 0.9  # share of the base's probe facts the version must keep (0: no check)

    def __post_init__(self) -> None:
        if self.metric not in GOALS:
            raise ValueError(f"unknown promotion metric {self.metric!r}; use one of: {', '.join(GOALS)}")
        if not (math.isfinite(self.margin) and math.isfinite(self.relative_margin)):
            raise ValueError("promotion margins must be finite numbers")
        if self.margin < 0 or self.relative_margin < 0:
            raise ValueError("promotion margins must be >= 0")
        if not 0.0 <= self.min_retention <= 1.0:
            raise ValueError("min_retention must be between 0 and 1")

    def required(self, reference: float) -> float:
        return max(self.margin, self.relative_margin * abs(reference))

    def improvement(self, value: float, reference: float) -> float:
        """How much better ``value`` is than ``reference`` (positive is better), whatever the goal."""
        return reference - value if GOALS[self.metric] == "min" else value - reference


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    metric: str
    value: float | None
    references: dict[str, float] = field(default_factory=dict)  # "base" / "production v3" -> value
    decided_s: float = field(default_factory=time.time)

    @property
    def outcome(self) -> str:
        return PROMOTED if self.promoted else REFUSED

    def tags(self) -> dict[str, str]:
        out = {"promotion.decision": self.outcome, "promotion.reason": self.reason,
               "promotion.metric": self.metric, "promotion.decided_at": _iso(self.decided_s)}
        if self.value is not None:
            out["promotion.value"] = f"{self.value:.6g}"
        for name, v in self.references.items():
            out[f"promotion.reference.{name.replace(' ', '_')}"] = f"{v:.6g}"
        return out


POLICY_TAG = "promotion.policy"  # the version's tag (``adapterfab.`` prefixed) with its batch's policy
POLICY_FIELDS = ("metric", "margin", "relative_margin", "min_retention")


def policy_tag(policy: Policy) -> str:
    """``policy`` as its batch records it on each version it registers (``POLICY_TAG``), so a later
    ``registry promote`` gates the version by the batch's rule, not by the CLI's defaults."""
    return json.dumps({k: getattr(policy, k) for k in POLICY_FIELDS}, sort_keys=True)


def recorded_policy(tags: dict[str, str]) -> Policy | None:
    """The policy recorded with a version (its tags, ``adapterfab.`` prefixed); None when none is (versions
    registered before it was recorded). ValueError when the recorded one cannot be read."""
    raw = tags.get("adapterfab." + POLICY_TAG)
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
        return Policy(**{k: fields[k] for k in POLICY_FIELDS if k in fields})
    except (ValueError, TypeError) as e:
        raise ValueError(f"its recorded promotion policy {raw!r} cannot be read ({e})") from None


def policy_for(tags: dict[str, str], given: dict[str, object]) -> tuple[Policy, str]:
    """The policy ``registry promote`` gates a version with: the one recorded with it at registration
    (its batch's ``promotion``), else ``Policy``'s defaults (those of the CLI), each field ``given``
    explicitly (its option, by field name) overriding it. Returns (the policy, a sentence saying which)."""
    try:
        recorded, unread = recorded_policy(tags), ""
    except ValueError as e:
        recorded, unread = None, f"; {e}"
    base = recorded or Policy()
    policy = Policy(**{k: given.get(k, getattr(base, k)) for k in POLICY_FIELDS})
    shown = ", ".join(f"{k} {getattr(policy, k):g}" if k != "metric" else f"metric {policy.metric}"
                      for k in POLICY_FIELDS)
    batch = tags.get("adapterfab.batch_id")
    source = (f"the policy recorded at registration{f' by batch {batch}' if batch else ''}" if recorded else
              f"`registry promote`'s defaults (the version records no policy{unread})")
    options = ", ".join(f"--{k.replace('_', '-')}" for k in POLICY_FIELDS if k in given)
    return policy, f"{shown} ({source}{f', overridden by {options}' if options else ''})"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _num(v: object) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def decide(policy: Policy, metrics: dict[str, object], production: tuple[int, float | None] | None
           ) -> Decision:
    """``metrics``: the candidate's metrics (``<metric>`` and ``base_<metric>``); ``production``:
    (version, its recorded metric or None) of the current production version, or None if there is none."""
    m = policy.metric
    value, base = _num(metrics.get(m)), _num(metrics.get(f"base_{m}"))
    notes = []
    if policy.min_retention > 0:
        kept, said = _num(metrics.get("retention")), retention.describe(metrics)
        if kept is not None and not math.isfinite(kept):  # NaN compares False: it would pass the check
            return Decision(False, f"retention is {kept}, not a measurement to promote on", m, value)
        if kept is not None and kept < policy.min_retention:
            return Decision(False, f"{said} is below the minimum {policy.min_retention:g}: the adapter has "
                                   "forgotten what the base knew (train less, or a lower learning rate)", m, value)
        notes.append(f"{said} (minimum {policy.min_retention:g})" if kept is not None else
                     (said or "no retention was measured") + "; not checked")
    if value is None:
        return Decision(False, f"the version has no recorded {m}", m, None)
    if not math.isfinite(value):  # a diverged run's NaN or inf compares False: it would beat every reference
        return Decision(False, f"{m} is {value}, not a measurement to promote on (the training diverged?)", m, None)
    if base is None or not math.isfinite(base):
        return Decision(False, f"no base-model {m} was measured to compare with"
                        + ("" if base is None else f" (it is {base})"), m, value)
    refs = {"base": base}
    if production is not None:
        pv, pval = production
        pval = None if pval is None else _num(pval)
        if pval is None or not math.isfinite(pval):
            notes.append(f"production v{pv} has no recorded {m}" + ("" if pval is None else f" (it has {pval})")
                         + "; compared with the base only")
        else:
            refs[f"production v{pv}"] = pval
    for name, ref in refs.items():
        gain, need = policy.improvement(value, ref), policy.required(ref)
        if gain <= need:
            return Decision(False, f"{m} {value:.4g} does not beat {name} {ref:.4g} by more than {need:.4g}",
                            m, value, refs)
    reason = f"{m} {value:.4g} beats " + " and ".join(f"{n} {r:.4g}" for n, r in refs.items())
    if policy.margin or policy.relative_margin:
        reason += f" (margin {policy.margin:g}, relative {policy.relative_margin:g})"
    return Decision(True, "; ".join([reason, *notes]), m, value, refs)


def decide_over(policy: Policy, metrics: dict[str, object], prod: Any, eval_sha256: str | None = None,
                version: Any = None) -> Decision:
    """``decide`` against ``prod``, the current production version (a registry version: its id, tags and
    metrics), or None when there is none, with the rule that figures measured on different eval rows
    (``eval_sha256``: the candidate's ``adapterfab.eval_sha256``) are not compared: such a candidate is
    refused even when it beats the base, and promoted only by hand. ``version``: the candidate's id, named
    in that advice; None while it does not exist yet (``promote: auto`` decides before registering)."""
    theirs = None if prod is None else prod.tags.get("adapterfab.eval_sha256")
    if eval_sha256 and theirs and eval_sha256 != theirs:  # figures on different rows say nothing of each other
        against_base = decide(policy, metrics, None)
        if not against_base.promoted:
            return against_base
        how = (f"`adapterfab registry promote {version.unversioned()} {version.version} --force`" if version else
               f"`adapterfab registry promote {prod.id.unversioned()} VERSION --force` with this version's number")
        return Decision(False, f"production v{prod.id.version} was evaluated on other rows than this version (a "
                               f"different eval split), so their {policy.metric} figures cannot be compared; "
                               f"{against_base.reason}. Promote it by hand after review ({how})",
                        policy.metric, against_base.value, against_base.references)
    return decide(policy, metrics, None if prod is None else (prod.id.version, prod.metrics.get(policy.metric)))


def gate_decision(registry: Any, version: Any, metrics: dict[str, Any], policy: Policy) -> Decision:
    """The promotion decision for ``version`` (a registry version: its id, tags and metrics) against the
    base and ``registry``'s current production version: ``decide_over``, as a batch's ``promote: auto``
    decides inside the registration (jobs/registrar.py). Used by ``registry promote``."""
    prod = registry.production(version.id)
    if prod is not None and prod.id.version == version.id.version:
        prod = None
    return decide_over(policy, metrics, prod, version.tags.get("adapterfab.eval_sha256"), version.id)
