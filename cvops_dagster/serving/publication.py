"""Publishing a gate decision: the target's runtime built or reused, verified, then switched into service.

:func:`publish_decision` is the ``onnx_runtime`` asset's one call. In order:

1. refuse a decision whose no-regression check failed, and one made against another champion
   than the one in service now (a concurrent publish or rollback came between): nothing written;
2. reuse the runtime already published for the target model when every file still verifies
   (hash, integrity seal, checker, embedded model id and weights hash), else build new
   content-addressed candidates (:func:`~cvops_dagster.serving.build.build_runtimes`) and check
   them; a failed parity check publishes nothing;
3. append the history event (``promoted``, ``republished`` or ``rollback``) that records the
   runtime, then rewrite ``production/current.json`` and ``production/serving.json`` from the
   replayed history (:func:`sync_pointers`), re-reading it until no concurrent event arrived
   meanwhile. An event another publisher beat is void in the replay: the pointers follow the
   winner and the loser's step fails with a clear error.

So after any failure ``current.json``, ``serving.json`` and the history agree (or the history
is ahead for the moment between its append and the pointer writes, which readers report with
the fix), and a file being served is never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.registry.decisions import Decision
from cvops_dagster.registry.history import (
    ChampionChangedError,
    ProductionStateError,
    Replay,
    append_event,
    event_keys,
    replay_history,
    write_current,
)
from cvops_dagster.serving.build import RuntimeBuild, build_runtimes
from cvops_dagster.serving.pointer import SERVING_KEY, ServingPointer, publish, read_pointer, verify_runtime_files
from cvops_dagster.serving.runtime_file import RuntimeModelError

logger = logging.getLogger(__name__)

SYNC_ROUNDS = 5
NEVER_PUBLISHED = "no runtime was published for it yet"


@dataclass
class Publication:
    """What :func:`publish_decision` did.

    Attributes:
        decision_id: the decision published.
        kind: the history event written (``promoted``, ``republished``, ``rollback``), ``unchanged``
            (the target already served with a runtime that verifies: nothing to write), or
            ``refused`` (a check on the new runtime failed: nothing written).
        model_id: the decision's target model.
        published: whether production now serves ``runtime``.
        runtime: the serving pointer (served, or the refused candidate).
        reused: the runtime was reused as published before, not rebuilt.
        build: the new build, when there was one.
        event: the history event written, if any.
        checks: parity and INT8 figures of ``runtime`` (recorded at publication time when reused).
        note: why a published runtime was rebuilt, when it was.
    """

    decision_id: str
    kind: str
    model_id: str
    published: bool
    runtime: dict[str, Any]
    reused: bool
    build: RuntimeBuild | None = None
    event: dict[str, Any] | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _publish_kind(decision: Decision, in_service: str | None, rollback_requested: bool) -> str:
    """``promoted``/``rollback``, or ``keep`` when the target is (or stays) in service.

    Raises:
        ChampionChangedError: production moved since the decision to another model than its target.
        ValueError: a rollback that was not requested now (see :func:`publish_decision`).
    """
    if in_service == decision.champion_id:
        if decision.kind == "rollback" and not rollback_requested:
            raise ValueError(
                f"decision {decision.decision_id} is a rollback to {decision.target_model_id} that was never published; "
                "a rollback is published only by the run that decided it: run `cvops rollback` again to roll back, "
                "or materialize production_model (`cvops run`) to decide anew"
            )
        return {"promote": "promoted", "keep": "keep", "rollback": "rollback"}[decision.kind]
    if in_service == decision.target_model_id:
        return "keep"  # this decision (or one with the same outcome) was already published
    raise ChampionChangedError(
        f"production changed since decision {decision.decision_id}: it was made against champion "
        f"{decision.champion_id}, but {in_service} is in service now (a concurrent publish or rollback). "
        "Nothing was published; materialize production_model again (`cvops run`) to decide against the current champion."
    )


def _reusable(storage: ArtifactStorage, history: Replay, model_id: str, model_hash: str | None) -> tuple[dict[str, Any] | None, str]:
    """The event whose runtime for ``model_id`` still verifies, else ``None`` and why not."""
    event = history.published_event(model_id)
    runtime = event["runtime"] if event else None
    if runtime is None:
        runtime = _legacy_runtime(storage, history, model_id)
        event = {"runtime": runtime, "checks": {}} if runtime else None
    if event is None:
        return None, NEVER_PUBLISHED
    try:
        verify_runtime_files(storage, ServingPointer.from_dict(event["runtime"], "history"), model_hash)
    except (RuntimeModelError, ProductionStateError, ValueError) as exc:
        return None, f"its published runtime no longer verifies: {exc}"
    return event, ""


def _legacy_runtime(storage: ArtifactStorage, history: Replay, model_id: str) -> dict[str, Any] | None:
    """The runtime the previous layout published for the champion (``serving.json`` only)."""
    champion = history.champion
    if champion is None or champion.model_id != model_id or champion.runtime is not None:
        return None
    try:
        pointer = read_pointer(storage)
    except ProductionStateError:
        return None
    return pointer.to_dict() if pointer is not None and pointer.model_id == model_id else None


def _build(storage: ArtifactStorage, decision: Decision, why: str, build: Callable[..., RuntimeBuild]) -> RuntimeBuild:
    target = decision.target_model_id
    if why != NEVER_PUBLISHED:
        # A runtime published before is being replaced (damaged, deleted): worth a warning.
        logger.warning("rebuilding the runtime of %s: %s", target, why)
    return build(storage, target, decision.target_dataset_version)


def _republish_reason(new_build: RuntimeBuild | None, why: str) -> str:
    if new_build is not None:
        return f"runtime rebuilt: {why}"
    return "runtime recorded: it was published before history events carried their runtime"


def publish_decision(
    storage: ArtifactStorage,
    decision: Decision,
    *,
    reuse_only: bool = False,
    rollback_requested: bool = True,
    build: Callable[..., RuntimeBuild] = build_runtimes,
) -> Publication:
    """Publish ``decision`` (see the module docstring for the steps).

    Args:
        storage: the artifact store.
        decision: a decision recorded by :mod:`cvops_dagster.registry.gate`.
        reuse_only: publish only a runtime already built and published for the target model
            (``cvops rollback --no-export``); fail when there is none that verifies.
        rollback_requested: whether a pending rollback decision may be published now. The asset
            passes ``False`` for a decision from an earlier run: a rollback whose own run failed
            is not completed later by a run (or the automation) that only meant to republish.
        build: the runtime builder (injectable for tests).

    Raises:
        ValueError: the decision failed its no-regression check, or is a rollback not requested now.
        ChampionChangedError: production changed since the decision, or a concurrent publisher won.
        FileNotFoundError: ``reuse_only`` and no verified runtime exists for the target.
    """
    if not decision.check_passed:
        raise ValueError(
            f"decision {decision.decision_id} failed check_production_model_no_regression "
            f"({decision.no_regression.get('reason')}); nothing is published"
        )
    history = replay_history(storage)
    champion = history.champion
    kind = _publish_kind(decision, champion.model_id if champion else None, rollback_requested)
    target = decision.target_model_id
    event, why = _reusable(storage, history, target, decision.target_model_hash)
    new_build = None
    note = "" if event is not None or why == NEVER_PUBLISHED else why  # a published runtime being replaced
    if event is not None:
        runtime, checks = dict(event["runtime"]), dict(event.get("checks") or {})
    elif reuse_only:
        raise FileNotFoundError(f"no runtime to reuse for model {target}: {why}; run without --no-export to build one")
    else:
        new_build = _build(storage, decision, why, build)
        runtime, checks = new_build.pointer().to_dict(), new_build.checks()
        if not new_build.passed:
            logger.warning("runtime candidate for %s failed parity; nothing published (%s)", target, runtime["fp32_key"])
            return Publication(decision.decision_id, "refused", target, False, runtime, False, new_build, None, checks, note)
        verify_runtime_files(storage, ServingPointer.from_dict(runtime, "candidate"), decision.target_model_hash)
    if kind == "keep":
        kind = "unchanged" if champion is not None and champion.runtime == runtime else "republished"
    written = None
    if kind != "unchanged":
        written = append_event(
            storage, kind, target, replaces=champion.model_id if champion else None, runtime=runtime,
            decision_id=decision.decision_id, dataset_version=decision.dataset_version or decision.target_dataset_version,
            metrics=decision.target_metrics, model_hash=decision.target_model_hash, checks=checks,
            reason=decision.reason if kind != "republished" else _republish_reason(new_build, why),
        )  # fmt: skip
    final = sync_pointers(storage, verified=runtime)
    if written is not None and written["event_id"] in final.void:
        served = final.champion.model_id if final.champion else None
        raise ChampionChangedError(
            f"a concurrent publisher came first: event {written['event_id']} ({kind} {target}) is void "
            f"({final.void[written['event_id']]}); production serves {served}. Materialize production_model again."
        )
    logger.info("decision %s: %s %s (runtime %s%s)", decision.decision_id, kind, target, runtime["fp32_key"], ", reused" if event else "")
    return Publication(decision.decision_id, kind, target, True, runtime, event is not None, new_build, written, checks, note)


def sync_pointers(storage: ArtifactStorage, verified: dict[str, Any] | None = None) -> Replay:
    """Rewrite ``current.json`` and ``serving.json`` from the replayed history, until no event
    arrived while they were written; returns the replay they reflect.

    Args:
        storage: the artifact store.
        verified: a runtime already verified by the caller (not checked again).

    Raises:
        ChampionChangedError: the history kept changing for :data:`SYNC_ROUNDS` rounds.
    """
    for _ in range(SYNC_ROUNDS):
        keys = event_keys(storage)
        history = replay_history(storage, keys)
        champion = history.champion
        if champion is not None:
            write_current(storage, champion)
            if champion.runtime is not None:
                _write_pointer(storage, ServingPointer.from_dict(champion.runtime, "history"), champion.model_hash, verified)
        if event_keys(storage) == keys:
            return history
        logger.info("production history changed while its pointers were written; writing them again")
    raise ChampionChangedError(f"the production history kept changing for {SYNC_ROUNDS} rounds; run again")


def _write_pointer(storage: ArtifactStorage, pointer: ServingPointer, model_hash: str | None, verified: dict[str, Any] | None) -> None:
    try:
        if read_pointer(storage) == pointer:
            return
    except ProductionStateError as exc:
        logger.warning("replacing an unreadable serving pointer: %s", exc)
    if verified is not None and ServingPointer.from_dict(verified, "verified") == pointer:
        storage.write_json(SERVING_KEY, pointer.to_dict())
    else:
        publish(storage, pointer, model_hash)
