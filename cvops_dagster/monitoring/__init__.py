"""Monitoring (next: the monitoring issue): predictions on production batches, the drift reference
and drift tests built on :mod:`cvops_dagster.imaging.features` (the features cleaning records),
and the policy that asks for retraining. Imports neither torch nor Lightning."""
