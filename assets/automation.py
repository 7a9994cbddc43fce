"""When downstream assets refresh on their own (evaluated by ``asset_update_sensor``).

Dagster's ``eager()`` reacts to any new materialization of a dependency. Here a dependency
counts only when its *data version* changed: every asset reports one (a batch's content hash,
the dataset version, the model id, the runtime hash), so re-ingesting an unchanged batch or
re-running an unchanged study does not set off a new study, training and export downstream.
"""

from dagster import AssetSelection, AutomationCondition

from cvops_dagster.core.settings import retrain_triggers

#: A dependency whose data version changed since the last tick (outside a run that also
#: targets this asset), or one being requested on this tick.
ANY_DEPS_DATA_CHANGED = AutomationCondition.any_deps_match(
    (AutomationCondition.data_version_changed() & ~AutomationCondition.executed_with_root_target()).with_label(
        "data_version_changed_without_root"
    )
    | AutomationCondition.will_be_requested()
).with_label("any_deps_data_changed")

#: Refresh once upstream data changed, after every blocking check upstream passed, never
#: while an upstream run is in flight: a new batch flows through to a new runtime, and a failed
#: expectation suite stops the flow exactly as it does inside one run.
ON_UPSTREAM_UPDATE = (
    AutomationCondition.eager().replace("any_deps_updated", ANY_DEPS_DATA_CHANGED)
    & AutomationCondition.all_deps_blocking_checks_passed()
)


def dataset_automation() -> AutomationCondition | None:
    """When ``cleaned_dataset`` refreshes on its own: on a new or changed labelled batch when
    ``CVOPS_RETRAIN_ON`` includes ``new_data`` (the default), else never by automation.

    New delayed labels (``review_feedback``) never start a dataset version here: the retraining
    policy for production labels is ``drift_retrain_sensor``'s (drift, and labels newer than the
    champion's dataset), so labels alone do not set off a study on every delivery.
    """
    if "new_data" not in retrain_triggers():
        return None
    # `ignore` reaches every dependency test inside: review_feedback neither triggers a new
    # version, nor holds one back while it is missing (no production label yet) or in progress.
    return ON_UPSTREAM_UPDATE.ignore(AssetSelection.assets("review_feedback"))
