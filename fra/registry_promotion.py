"""Champion promotion with a recorded decision history, and rollback.

A candidate version takes the ``champion`` alias only if it is ``ready``, it was evaluated with
the same protocol (``fra.eval_protocol``) on the same data (``fra.dataset_fingerprint``) as the
current champion, and it beats the champion's gate metric by more than ``margin`` (``mode="max"``:
``candidate - champion > margin``; ``"min"``: ``champion - candidate > margin``; a tie keeps the
champion). The first ready version with the metric is promoted when there is no champion yet.

Every decision, including refusals, is appended to a JSON history kept in registered-model tags
(time, candidate, previous champion, both metric values, decision, reason, who = user@host) and to
the candidate's ``fra.decisions`` version tag. MLflow stores registered-model tag values in a
VARCHAR(5000) column, so the history is paged: ``fra.promotion_history`` holds the newest page and
full pages move to ``fra.promotion_history.0001``, ``.0002``, ... (count in
``fra.promotion_history.pages``). :func:`read_history` joins them.

**Compare-and-set.** Two pipelines finishing together must not both beat a stale champion. Each
promotion (and rollback) reads the champion, decides, moves the alias and appends the history
while holding the model's promotion lock (:mod:`fra.registry_lock`: an atomic create in the
registry). Just before writing it checks that the lock is still its own and that the champion is
still the one it judged against; if not (a stale lock was broken, or someone moved the alias by
hand), it decides again from the new state, up to ``CONFLICT_RETRIES`` times.
"""
from __future__ import annotations

import getpass
import json
import logging
import socket
import time
import uuid
from dataclasses import asdict, dataclass

from fra.errors import FraError
from fra.registry.connection import (CHAMPION, DATASET_TAG, METRIC_TAG_PREFIX, PROTOCOL_TAG, READY, STATUS_TAG,
                                     ModelVersionInfo, RegistryError, call, champion_version, check_reachable, client,
                                     get_version, resolve_uri)
from fra.registry_lock import LockConflict, check_held, promotion_lock

log = logging.getLogger(__name__)

HISTORY_TAG = "fra.promotion_history"
HISTORY_PAGES_TAG = "fra.promotion_history.pages"
PAGE_LIMIT = 5000
DECISIONS_TAG = "fra.decisions"
CONFLICT_RETRIES = 3


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of :func:`promote` or :func:`rollback`.

    ``decision`` is ``promoted``, ``refused``, ``unchanged`` (already champion) or ``rolled_back``;
    ``champion`` is the champion after the decision.
    """

    name: str
    candidate: int
    previous_champion: int | None
    champion: int | None
    metric: str
    candidate_value: float | None
    champion_value: float | None
    margin: float
    mode: str
    decision: str
    reason: str
    time: str
    who: str
    id: str = ""

    @property
    def promoted(self) -> bool:
        return self.decision in ("promoted", "rolled_back")

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        champion = f"v{self.champion}" if self.champion is not None else "none"
        return f"{self.name} v{self.candidate}: {self.decision} ({self.reason}); champion: {champion}"


LOWER_IS_BETTER = ("nme", "fr", "rmse", "loss", "error")


def gate_mode(metric: str, mode: str = "auto") -> str:
    """``mode``, or for ``auto`` the direction of ``metric`` by its name: ``min`` when a ``_``/``.``-separated
    word of it is an error (``landmarks_nme_mean_last_k``, ``fr.full``, ``rmse``), else ``max``."""
    if mode != "auto":
        return mode
    words = metric.lower().replace(".", "_").split("_")
    return "min" if any(w in LOWER_IS_BETTER for w in words) else "max"


def promote(name: str, version: int | str, *, gate_metric: str = "fer_top1_mean_last5", margin: float = 0.0,
            mode: str = "max", tracking_uri: str | None = None) -> PromotionDecision:
    """Give ``version`` the ``champion`` alias if it beats the champion (see the module docstring).

    Returns:
        The recorded decision; ``decision.promoted`` tells whether the alias moved.

    Raises:
        RegistryError: unreachable registry, unknown model/version, or the decision could not be
            recorded (the alias is then put back).
    """
    mode = gate_mode(gate_metric, mode)
    if mode not in ("max", "min"):
        raise FraError(f"promotion mode must be 'max', 'min' or 'auto', got {mode!r}")
    if margin < 0:
        raise FraError(f"promotion margin must be >= 0, got {margin}")
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    mlc = client(uri)

    def decide(token: str) -> PromotionDecision:
        cand = _version(mlc, name, version)
        champ_v = champion_version(mlc, name)
        champ = _version(mlc, name, champ_v) if champ_v is not None else None
        cand_value = _metric(mlc, cand, gate_metric)
        champ_value = _metric(mlc, champ, gate_metric) if champ else None
        decision, reason = _judge(cand, champ, cand_value, champ_value, gate_metric, margin, mode)
        entry = _entry(name, cand.version, champ_v, gate_metric, cand_value, champ_value, margin, mode, decision,
                       reason)
        _check_unchanged(mlc, name, token, champ_v)
        if decision == "promoted":
            _move_alias_and_record(mlc, name, entry, restore=champ_v)
        else:
            _record(mlc, name, entry)
        return entry

    entry = _locked(mlc, name, decide)
    log.info("%s", entry)
    return entry


def _locked(mlc, name: str, decide) -> PromotionDecision:
    """Run ``decide(token)`` under the promotion lock; decide again after a conflict."""
    for attempt in range(1, CONFLICT_RETRIES + 1):
        try:
            with promotion_lock(mlc, name, _who()) as token:
                return decide(token)
        except LockConflict as exc:
            if attempt == CONFLICT_RETRIES:
                raise
            log.warning("%s; deciding again (%d/%d)", exc, attempt, CONFLICT_RETRIES - 1)
    raise AssertionError("unreachable")


def _check_unchanged(mlc, name: str, token: str, champion: int | None) -> None:
    """The version check before any write: the lock is still ours and the champion is the one judged."""
    check_held(mlc, name, token)
    now = champion_version(mlc, name)
    if now != champion:
        raise LockConflict(f"{name}: the champion moved from v{champion} to v{now} while deciding")


def _judge(cand: ModelVersionInfo, champ: ModelVersionInfo | None, cand_value: float | None,
           champ_value: float | None, metric: str, margin: float, mode: str) -> tuple[str, str]:
    """(decision, reason) for a candidate against the current champion."""
    if cand.status != READY:
        return "refused", f"candidate v{cand.version} has {STATUS_TAG}={cand.status or 'unset'}, not {READY}"
    if champ is not None and champ.version == cand.version:
        return "unchanged", f"v{cand.version} is already the champion"
    if cand_value is None:
        return "refused", f"candidate v{cand.version} has no {metric!r} metric"
    if champ is None:
        return "promoted", f"no champion yet; {metric}={cand_value:.6g}"
    for tag, what in ((PROTOCOL_TAG, "evaluation protocol"), (DATASET_TAG, "dataset fingerprint")):
        a, b = cand.tags.get(tag, ""), champ.tags.get(tag, "")
        if not a:
            return "refused", f"candidate v{cand.version} has no {what} ({tag}); cannot compare"
        if a != b:
            return "refused", f"{what} differs: candidate v{cand.version} {a!r} vs champion v{champ.version} {b!r}"
    if champ_value is None:
        return "refused", f"champion v{champ.version} has no {metric!r} metric; cannot compare"
    gain = cand_value - champ_value if mode == "max" else champ_value - cand_value
    versus = (f"{metric} {cand_value:.6g} vs champion v{champ.version} {champ_value:.6g} "
              f"(mode {mode}, margin {margin:g})")
    if gain > margin:
        return "promoted", f"beats the champion: {versus}"
    return "refused", f"does not beat the champion by more than the margin: {versus}"


def rollback(name: str, *, tracking_uri: str | None = None) -> PromotionDecision:
    """Give ``champion`` back to the version the current champion replaced (from the history)."""
    uri = resolve_uri(tracking_uri)
    check_reachable(uri)
    mlc = client(uri)
    entry = _locked(mlc, name, lambda token: _rollback(mlc, name, token))
    log.info("%s", entry)
    return entry


def _rollback(mlc, name: str, token: str) -> PromotionDecision:
    current = champion_version(mlc, name)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    made = [e for e in read_history(mlc, name) if e.get("decision") == "promoted" and e.get("candidate") == current]
    if not made:
        raise RegistryError(f"{name}: champion v{current} was not set by `fra registry promote`; "
                            "no history to roll back")
    target = made[-1].get("previous_champion")
    if target is None:
        raise RegistryError(f"{name}: v{current} was the first champion; there is nothing earlier to restore")
    prev = _version(mlc, name, target)
    if prev.status != READY:
        raise RegistryError(f"{name}: cannot restore v{target}: {STATUS_TAG}={prev.status or 'unset'}")
    metric = made[-1].get("metric", "")
    entry = _entry(name, target, current, metric, _metric(mlc, prev, metric) if metric else None,
                   _metric(mlc, _version(mlc, name, current), metric) if metric else None, 0.0,
                   made[-1].get("mode", "max"), "rolled_back",
                   f"rollback: v{target} restored, replacing v{current} (which had replaced it)")
    _check_unchanged(mlc, name, token, current)
    _move_alias_and_record(mlc, name, entry, restore=current)
    return entry


def read_history(mlc, name: str) -> list[dict]:
    """Every recorded decision for ``name``, oldest first."""
    tags = call("get registered model", lambda: mlc.get_registered_model(name)).tags or {}
    pages = [tags.get(f"{HISTORY_TAG}.{i:04d}", "[]") for i in range(1, int(tags.get(HISTORY_PAGES_TAG, 0)) + 1)]
    seen, out = set(), []
    for page in [*pages, tags.get(HISTORY_TAG, "[]")]:
        for entry in json.loads(page):
            if entry.get("id") not in seen:  # an interrupted page move can duplicate entries
                seen.add(entry.get("id"))
                out.append(entry)
    return out


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _version(mlc, name: str, version) -> ModelVersionInfo:
    from mlflow.exceptions import MlflowException

    try:
        return get_version(mlc, name, version)
    except MlflowException as exc:
        raise RegistryError(f"{name} version {version}: {str(exc).splitlines()[0][:200]}") from exc


def _metric(mlc, info: ModelVersionInfo, metric: str) -> float | None:
    """The gate metric from the version's tags, else from its run's metrics."""
    tagged = info.tags.get(METRIC_TAG_PREFIX + metric)
    if tagged is not None:
        return float(tagged)
    if not info.run_id:
        return None
    value = call("get run", lambda: mlc.get_run(info.run_id)).data.metrics.get(metric)
    return float(value) if value is not None else None


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _entry(name, candidate, previous, metric, cand_value, champ_value, margin, mode, decision,
           reason) -> PromotionDecision:
    champion = candidate if decision in ("promoted", "rolled_back") else previous
    return PromotionDecision(name=name, candidate=int(candidate), previous_champion=previous, champion=champion,
                             metric=metric, candidate_value=cand_value, champion_value=champ_value,
                             margin=float(margin), mode=mode, decision=decision, reason=reason[:500],
                             time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), who=_who(),
                             id=uuid.uuid4().hex[:12])


def _move_alias_and_record(mlc, name: str, entry: PromotionDecision, restore: int | None) -> None:
    """Set the alias, then record; if recording fails, put the previous champion back."""
    call("set champion alias", lambda: mlc.set_registered_model_alias(name, CHAMPION, str(entry.candidate)))
    try:
        _record(mlc, name, entry)
        if entry.previous_champion is not None:
            call("tag replaced champion", lambda: mlc.set_model_version_tag(
                name, str(entry.previous_champion), "fra.replaced_by", f"v{entry.candidate} at {entry.time}"))
    except Exception as exc:
        if restore is None:
            call("remove champion alias", lambda: mlc.delete_registered_model_alias(name, CHAMPION), attempts=2)
        else:
            call("restore champion alias",
                 lambda: mlc.set_registered_model_alias(name, CHAMPION, str(restore)), attempts=2)
        raise RegistryError(f"{name}: could not record the decision, champion left at v{restore}: {exc}") from exc


def _record(mlc, name: str, entry: PromotionDecision) -> None:
    """Append ``entry`` to the model's paged history and to the candidate's decisions tag."""
    item = entry.to_dict()
    tags = call("get registered model", lambda: mlc.get_registered_model(name)).tags or {}
    page = json.loads(tags.get(HISTORY_TAG, "[]"))
    if page and len(json.dumps([*page, item])) > PAGE_LIMIT:
        n = int(tags.get(HISTORY_PAGES_TAG, 0)) + 1
        archived = json.dumps(page)
        call("archive history page", lambda: mlc.set_registered_model_tag(name, f"{HISTORY_TAG}.{n:04d}", archived))
        call("count history pages", lambda: mlc.set_registered_model_tag(name, HISTORY_PAGES_TAG, str(n)))
        page = []
    new_page = json.dumps([*page, item])
    call("write history", lambda: mlc.set_registered_model_tag(name, HISTORY_TAG, new_page))
    mv = call("get model version", lambda: mlc.get_model_version(name, str(entry.candidate)))
    decisions = json.loads((mv.tags or {}).get(DECISIONS_TAG, "[]")) + [item]
    call("tag candidate", lambda: mlc.set_model_version_tag(name, str(entry.candidate), DECISIONS_TAG,
                                                          json.dumps(decisions)))
