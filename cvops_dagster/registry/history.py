"""The production history: one immutable JSON object per publish event, and the champion replayed from it.

Layout in the artifact store (docs/contracts.md, "Production"):

* ``production/history/<UTC timestamp, microseconds>-<uuid4 hex>.json``: one event each, written
  once under a name no other writer can pick. Appending never reads or rewrites another object,
  so concurrent appenders (a rollback beside a promotion, two workers) never lose an entry, on a
  folder or on S3, with no lock and no conditional write.
* ``production/history.json``: the list the previous layout kept; still read, as the oldest events.
* ``production/current.json``: the champion record, a convenience copy of the replay that the
  publisher (:mod:`cvops_dagster.serving.publication`) rewrites after every event.

An event is ``promoted`` (a challenger goes into service), ``republished`` (the champion's runtime
was rebuilt) or ``rollback`` (the previous champion comes back). Each new event names the model
it expected in service before it (``replaces``) and the runtime it published (``runtime``: the
``production/serving.json`` content, keys and SHA-256s). :func:`replay` applies the events in
name order (timestamp, then the random part): promotions push a champion, rollbacks pop one,
republishes swap the runtime. An event whose ``replaces`` is not the champion at its place in the
replay lost a race with a concurrent publisher: it is *void*, ignored, and reported as such, so
every reader derives the same champion from the same objects.

Plain JSON and the standard library only: ``cvops predict`` reads the history to cross-check
``serving.json``, and must stay light.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from cvops_dagster.core.storage import ArtifactStorage

logger = logging.getLogger(__name__)

HISTORY_PREFIX = "production/history"
LEGACY_HISTORY_KEY = "production/history.json"
CURRENT_KEY = "production/current.json"

EVENT_KINDS = ("promoted", "republished", "rollback")
SCHEMA_VERSION = 1

#: What to do about a production file that is unreadable or disagrees with the history.
REPUBLISH = "republish with `cvops run --select onnx_runtime` (it rewrites current.json and serving.json from the history)"
HASH_NOTE = (
    "SHA-256 pins detect corruption and accidental edits, not deliberate tampering: "
    "they are not signatures"
)


class ProductionStateError(ValueError):
    """A production file (current.json, serving.json, a history event, a decision) is truncated,
    invalid, or disagrees with the history. The message names the file and what to do."""


class ChampionChangedError(RuntimeError):
    """Production changed between a decision and its publication (a concurrent publish or rollback)."""


# --------------------------------------------------------------------------- reading files


def read_record(storage: ArtifactStorage, key: str, *, remedy: str, kind: type = dict) -> Any:
    """The JSON object (or list) at ``key``, or a :class:`ProductionStateError` naming its URI and ``remedy``.

    Raises:
        FileNotFoundError: ``key`` does not exist.
        ProductionStateError: the file is truncated, not JSON, or not a ``kind``.
    """
    uri = storage.uri(key)
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ProductionStateError(f"{uri}: cannot be read ({exc}); {remedy}") from exc
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProductionStateError(f"{uri}: truncated or invalid JSON ({exc}); {remedy}") from exc
    if not isinstance(value, kind):
        raise ProductionStateError(f"{uri}: expected a JSON {'object' if kind is dict else 'list'}, got {type(value).__name__}; {remedy}")
    return value


def _event_remedy(uri: str) -> str:
    return (
        f"history events are written once and never edited, so {uri} was damaged after it was written: "
        "restore it from a backup, or move it out of production/history/ if it records nothing you need "
        "(the champion is replayed from the remaining events), then republish with "
        "`cvops run --select onnx_runtime`"
    )


def _require(event: Mapping[str, Any], uri: str, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in event]
    if missing:
        raise ProductionStateError(f"{uri}: history event lacks {missing}; {_event_remedy(uri)}")


def _check_runtime(runtime: Any, uri: str) -> None:
    if runtime is None:
        return
    if not isinstance(runtime, dict) or not all(isinstance(runtime.get(k), str) for k in ("model_id", "fp32_key", "fp32_sha256")):
        raise ProductionStateError(f"{uri}: history event has an invalid runtime record; {_event_remedy(uri)}")
    if (runtime.get("int8_key") is None) != (runtime.get("int8_sha256") is None):
        raise ProductionStateError(f"{uri}: history event pins an INT8 runtime without its SHA-256; {_event_remedy(uri)}")


def _validated(event: Any, uri: str) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise ProductionStateError(f"{uri}: a history event must be a JSON object; {_event_remedy(uri)}")
    _require(event, uri, ("event", "model_id", "at", "event_id", "replaces", "runtime"))
    if event["event"] not in EVENT_KINDS:
        raise ProductionStateError(f"{uri}: unknown history event {event['event']!r}; {_event_remedy(uri)}")
    if not isinstance(event["model_id"], str) or not event["model_id"]:
        raise ProductionStateError(f"{uri}: history event has no model id; {_event_remedy(uri)}")
    _check_runtime(event["runtime"], uri)
    return event


def _legacy_events(storage: ArtifactStorage) -> list[dict[str, Any]]:
    """The previous layout's ``history.json`` as events of this one (``legacy: true``)."""
    if not storage.exists(LEGACY_HISTORY_KEY):
        return []
    uri = storage.uri(LEGACY_HISTORY_KEY)
    remedy = f"restore {uri} from a backup (it holds the oldest production events), then republish with `cvops run --select onnx_runtime`"
    entries = read_record(storage, LEGACY_HISTORY_KEY, remedy=remedy, kind=list)
    events = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"event", "model_id", "at"} <= set(entry):
            raise ProductionStateError(f"{uri}: entry {i} is not a history event; {remedy}")
        if entry["event"] not in ("promoted", "rollback"):
            continue  # "rejected" decisions changed nothing in production
        events.append(
            {
                "event": entry["event"],
                "event_id": f"legacy-{i:06d}",
                "model_id": entry["model_id"],
                # The old rollback entry named the restored model and, as champion_id, the dropped one.
                "replaces": entry.get("champion_id"),
                "at": entry["at"],
                "dataset_version": entry.get("dataset_version"),
                "metrics": entry.get("challenger_metrics") or {},
                "runtime": None,
                "reason": entry.get("reason"),
                "legacy": True,
            }
        )
    return events


def event_keys(storage: ArtifactStorage) -> list[str]:
    """Keys of the event objects, in history order (their names sort by time)."""
    return [k for k in storage.list(HISTORY_PREFIX) if k.endswith(".json")]


def read_history(storage: ArtifactStorage, keys: list[str] | None = None) -> list[dict[str, Any]]:
    """Every publish event, oldest first: the legacy ``history.json`` entries, then the event objects.

    Args:
        storage: the artifact store.
        keys: the event objects to read (default: all, from :func:`event_keys`).

    Raises:
        ProductionStateError: an event (or the legacy list) is truncated or invalid, naming its URI.
    """
    events = _legacy_events(storage)
    keys = event_keys(storage) if keys is None else keys
    for key, data in zip(keys, storage.read_many(keys), strict=True):
        uri = storage.uri(key)
        try:
            event = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProductionStateError(f"{uri}: truncated or invalid JSON ({exc}); {_event_remedy(uri)}") from exc
        events.append(_validated(event, uri))
    return events


# --------------------------------------------------------------------------- appending


def _event_key(now: datetime) -> str:
    # Fixed-width UTC timestamp first: names sort in time order; the uuid4 makes each unique.
    return f"{HISTORY_PREFIX}/{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex}.json"


def append_event(
    storage: ArtifactStorage,
    kind: str,
    model_id: str,
    *,
    replaces: str | None,
    runtime: Mapping[str, Any],
    **details: Any,
) -> dict[str, Any]:
    """Write one publish event as a new immutable object; returns it (with ``event_id`` and ``at``).

    Args:
        storage: the artifact store.
        kind: ``promoted``, ``republished`` or ``rollback``.
        model_id: the model in service after the event.
        replaces: the model that had to be in service before it (``None``: no champion yet); the
            replay voids the event when another publisher got there first.
        runtime: the serving pointer it published (``model_id``, ``dataset_version``, ``fp32_key``,
            ``fp32_sha256``, ``int8_key``, ``int8_sha256``).
        details: further JSON fields (``decision_id``, ``dataset_version``, ``metrics``,
            ``model_hash``, ``checks``, ``reason``).
    """
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
    now = datetime.now(UTC)
    key = _event_key(now)
    event = {
        **details,
        "schema": SCHEMA_VERSION,
        "event": kind,
        "event_id": PurePosixPath(key).stem,
        "at": now.isoformat(),
        "model_id": model_id,
        "replaces": replaces,
        "runtime": dict(runtime),
    }
    _validated(json.loads(json.dumps(event, default=str)), storage.uri(key))
    storage.write_json(key, event)
    logger.info("history: %s %s (replaces %s) as %s", kind, model_id, replaces, key)
    return event


# --------------------------------------------------------------------------- replay


@dataclass(frozen=True)
class Champion:
    """A model in service, as the replay leaves it.

    Attributes:
        model_id: the model.
        promoted_at: when its promotion event was written.
        dataset_version: the dataset its promotion was decided on.
        metrics: its figures on that dataset's test split (``accuracy``, ``macro_f1``, ``n``).
        model_hash: its weights' SHA-256 (model card), when recorded.
        runtime: the serving pointer last published for it (``None`` for legacy events).
        event_id: the last event that changed it.
        decision_id: the decision behind that event, when recorded.
        previous_model_id: the model it replaced (after a promotion) or that was rolled back
            from it (after a rollback).
        restored_at: when a rollback brought it back, else ``None``.
    """

    model_id: str
    promoted_at: str
    dataset_version: str | None
    metrics: dict[str, Any]
    model_hash: str | None
    runtime: dict[str, Any] | None
    event_id: str
    decision_id: str | None = None
    previous_model_id: str | None = None
    restored_at: str | None = None

    def record(self) -> dict[str, Any]:
        """The ``production/current.json`` content."""
        record = asdict(self)
        record["test_accuracy"] = self.metrics.get("accuracy")
        if self.restored_at is None:
            record.pop("restored_at")
        return record


@dataclass
class Replay:
    """The history replayed: the champion stack (current last), and what was applied or void."""

    stack: list[Champion] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)
    void: dict[str, str] = field(default_factory=dict)
    rolled_back: dict[str, str] = field(default_factory=dict)

    @property
    def champion(self) -> Champion | None:
        """The model in service, or ``None`` before the first promotion."""
        return self.stack[-1] if self.stack else None

    @property
    def last_event_id(self) -> str | None:
        """The last applied event (decisions record it, to know what production they saw)."""
        return self.applied[-1]["event_id"] if self.applied else None

    def published_event(self, model_id: str) -> dict[str, Any] | None:
        """The applied event that most recently published a runtime for ``model_id``, if any."""
        for event in reversed(self.applied):
            if event["model_id"] == model_id and event.get("runtime"):
                return event
        return None


def _champion_of(event: Mapping[str, Any], previous: str | None) -> Champion:
    return Champion(
        model_id=event["model_id"],
        promoted_at=event["at"],
        dataset_version=event.get("dataset_version"),
        metrics=dict(event.get("metrics") or {}),
        model_hash=event.get("model_hash"),
        runtime=event.get("runtime"),
        event_id=event["event_id"],
        decision_id=event.get("decision_id"),
        previous_model_id=previous,
    )


def _apply(result: Replay, event: dict[str, Any]) -> str | None:
    """Apply one event to ``result``; returns why it is void, or ``None`` when applied."""
    stack, top = result.stack, result.champion
    top_id = top.model_id if top else None
    legacy = bool(event.get("legacy"))
    kind = event["event"]
    if not legacy and event["replaces"] != top_id:
        return f"expected {event['replaces']} in service, found {top_id}: a concurrent publish came first"
    if kind == "promoted":
        stack.append(_champion_of(event, top_id))
    elif kind == "republished":
        if top is None or top.model_id != event["model_id"]:
            return f"republishes {event['model_id']}, but {top_id} is in service"
        stack[-1] = replace(top, runtime=event["runtime"], event_id=event["event_id"], decision_id=event.get("decision_id"))
    else:  # rollback
        if len(stack) < 2 or (not legacy and stack[-2].model_id != event["model_id"]):
            below = stack[-2].model_id if len(stack) > 1 else None
            return f"restores {event['model_id']}, but the champion before {top_id} is {below}"
        dropped = stack.pop()
        result.rolled_back[dropped.model_id] = event["at"]
        restored = stack[-1]
        stack[-1] = replace(
            restored,
            runtime=event.get("runtime") or restored.runtime,
            event_id=event["event_id"],
            decision_id=event.get("decision_id"),
            previous_model_id=dropped.model_id,
            restored_at=event["at"],
        )
    return None


def replay(events: list[dict[str, Any]]) -> Replay:
    """Replay ``events`` (oldest first) into the champion stack; see the module docstring for the rules."""
    result = Replay()
    for event in events:
        why = _apply(result, event)
        if why is None:
            result.applied.append(event)
        else:
            result.void[event["event_id"]] = why
            logger.info("history event %s (%s %s) is void: %s", event["event_id"], event["event"], event["model_id"], why)
    return result


def replay_history(storage: ArtifactStorage, keys: list[str] | None = None) -> Replay:
    """:func:`replay` of :func:`read_history` (of the event objects ``keys``, default all)."""
    return replay(read_history(storage, keys))


# --------------------------------------------------------------------------- the champion


def write_current(storage: ArtifactStorage, champion: Champion | None) -> None:
    """Rewrite ``production/current.json`` from the replayed champion (nothing to write without one)."""
    if champion is not None:
        storage.write_json(CURRENT_KEY, champion.record())


def current_champion(storage: ArtifactStorage) -> dict[str, Any] | None:
    """The champion record (``current.json``'s content), replayed from the history; ``None`` before
    the first promotion.

    The history is the source of truth: ``current.json`` is a copy the publisher rewrites after
    each event. A copy that names another model (a publish interrupted between the two writes)
    is logged and the history wins; an unreadable one is an error naming it.

    Raises:
        ProductionStateError: a history event or ``current.json`` is truncated or invalid.
    """
    champion = replay_history(storage).champion
    if storage.exists(CURRENT_KEY):
        copy = read_record(storage, CURRENT_KEY, remedy=REPUBLISH)
        if champion is None or copy.get("model_id") != champion.model_id:
            logger.warning(
                "%s names %s but the production history names %s; using the history (%s)",
                storage.uri(CURRENT_KEY), copy.get("model_id"), champion.model_id if champion else None, REPUBLISH,
            )
    return champion.record() if champion else None


def production_summary(storage: ArtifactStorage) -> dict[str, Any]:
    """``model_id``, ``test_accuracy``, ``promoted_at`` and ``dataset_version`` of the champion
    (all ``None`` when there is none)."""
    champion = current_champion(storage) or {}
    return {k: champion.get(k) for k in ("model_id", "test_accuracy", "promoted_at", "dataset_version")}
