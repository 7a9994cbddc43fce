"""When downstream assets refresh on their own (evaluated by ``asset_update_sensor``)."""

from dagster import AutomationCondition

#: Refresh once upstream data changed, after every blocking check upstream passed, never
#: while an upstream run is in flight: a new batch flows through to a new runtime, and a failed
#: expectation suite stops the flow exactly as it does inside one run.
ON_UPSTREAM_UPDATE = AutomationCondition.eager() & AutomationCondition.all_deps_blocking_checks_passed()
