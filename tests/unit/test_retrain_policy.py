"""The drift retraining policy (pure): which drift events request one retraining, and which wait."""

from __future__ import annotations

import pytest

from cvops_dagster.monitoring.policy import DriftEvent, LabelsState, RetrainDecision, decide_retraining, open_events

CHAMPION = "model-a"
NEW_LABELS = LabelsState("fb1", 12, frozenset({"fb0"}))


def event(batch: str, model: str = CHAMPION, drift: bool | None = True, at: float = 0.0, fingerprint: str = "f") -> DriftEvent:
    return DriftEvent(
        event=f"{batch}:{fingerprint}:{model}", batch_id=batch, model_id=model, drift=drift, score=0.99 if drift else 0.1,
        threshold=0.95, reported_at=at,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (LabelsState(None, 0), False),  # never collected
        (LabelsState("", 3), False),  # no version
        (LabelsState("fb1", 0), False),  # collected, nothing labelled
        (LabelsState("fb1", 5), True),
        (LabelsState("fb1", 5, frozenset({"fb1"})), False),  # already in a dataset version
        (LabelsState("fb1", 5, frozenset({"fb0", "fb2"})), True),
    ],
)
def test_new_labels(labels: LabelsState, expected: bool) -> None:
    assert labels.new_labels is expected


def test_drift_without_labels_waits() -> None:
    events = [event("p1")]
    decision = decide_retraining(events, CHAMPION, handled=[], labels=LabelsState(None, 0))
    assert decision.request == () and decision.run_key is None
    assert decision.waiting == tuple(events)
    assert "waiting" in decision.reason and "no labelled production images" in decision.reason


def test_labels_arriving_make_one_request_for_every_open_event() -> None:
    events = [event("p2", at=2.0), event("p1", at=1.0), event("p3", drift=False, at=0.5)]
    decision = decide_retraining(events, CHAMPION, handled=[], labels=NEW_LABELS)
    assert [e.batch_id for e in decision.request] == ["p1", "p2"]  # open events only, oldest first
    assert decision.waiting == ()
    assert decision.run_key is not None and decision.run_key.startswith("drift-retrain:")
    assert "p1" in decision.reason and "p2" in decision.reason and CHAMPION in decision.reason
    assert "12 labelled" in decision.reason


@pytest.mark.parametrize(
    ("champion", "handled", "in_flight", "labels", "requested", "waiting", "reason"),
    [
        # A new champion closes the events of the model it replaced.
        ("model-b", [], False, NEW_LABELS, 0, 0, "no open drift event"),
        # Nothing served yet: nothing is open.
        (None, [], False, NEW_LABELS, 0, 0, "no open drift event"),
        # An earlier request handled the event.
        (CHAMPION, ["p1:f:model-a"], False, NEW_LABELS, 0, 0, "no open drift event"),
        # A drift retraining in flight: the event waits for its outcome.
        (CHAMPION, [], True, NEW_LABELS, 0, 1, "already in flight"),
        # The feedback version is one a dataset already consumed: retraining would be futile.
        (CHAMPION, [], False, LabelsState("fb1", 12, frozenset({"fb1"})), 0, 1, "already in a dataset version"),
        # Collected, but no image labelled.
        (CHAMPION, [], False, LabelsState("fb1", 0), 0, 1, "no labelled production images"),
        (CHAMPION, [], False, NEW_LABELS, 1, 0, "drift on p1"),
    ],
)
def test_decision_table(
    champion: str | None, handled: list[str], in_flight: bool, labels: LabelsState, requested: int, waiting: int, reason: str
) -> None:
    decision = decide_retraining([event("p1")], champion, handled, labels, in_flight=in_flight)
    assert (len(decision.request), len(decision.waiting)) == (requested, waiting)
    assert reason in decision.reason
    assert (decision.run_key is None) is (requested == 0)


@pytest.mark.parametrize("drift", [False, None])
def test_no_drift_and_no_verdict_never_request(drift: bool | None) -> None:
    events = [event("p1", drift=drift), event("p2", drift=drift)]
    decision = decide_retraining(events, CHAMPION, [], NEW_LABELS)
    assert decision.request == () and decision.waiting == ()
    assert open_events(events, CHAMPION, []) == []


def test_open_events_filters_and_orders() -> None:
    events = [
        event("p3", at=3.0),
        event("p1", at=1.0),
        event("old", model="model-0", at=0.0),  # replaced model
        event("done", at=0.5),
        event("calm", drift=False, at=0.1),
        event("p2", at=1.0),  # same time as p1: batch id breaks the tie
    ]
    found = open_events(events, CHAMPION, handled=["done:f:model-a"])
    assert [e.batch_id for e in found] == ["p1", "p2", "p3"]
    assert open_events(events, None, []) == []


def test_handled_events_are_matched_by_event_not_batch() -> None:
    # The same batch with new images is a new event, even if the old one was handled.
    events = [event("p1", fingerprint="g")]
    decision = decide_retraining(events, CHAMPION, ["p1:f:model-a"], NEW_LABELS)
    assert [e.event for e in decision.request] == ["p1:g:model-a"]


def test_run_key_stable_and_order_independent() -> None:
    a, b, c = event("p1"), event("p2"), event("p3")
    one = RetrainDecision(request=(a, b, c)).run_key
    assert one == RetrainDecision(request=(c, a, b)).run_key
    assert one == RetrainDecision(request=(b, c, a), reason="another reason").run_key
    assert one != RetrainDecision(request=(a, b)).run_key
    assert one != RetrainDecision(request=(a, b, event("p3", fingerprint="other"))).run_key
    assert RetrainDecision().run_key is None
    # Through the policy: the event order given does not change the key.
    forward = decide_retraining([a, b, c], CHAMPION, [], NEW_LABELS).run_key
    backward = decide_retraining([c, b, a], CHAMPION, [], NEW_LABELS).run_key
    assert forward == backward == one


def test_reason_without_scores_names_the_batches() -> None:
    unscored = DriftEvent("p1:f:model-a", "p1", CHAMPION, True, None, None)
    decision = decide_retraining([unscored], CHAMPION, [], NEW_LABELS)
    assert len(decision.request) == 1 and "drift on p1" in decision.reason
