"""Below every stage: artifact storage, environment settings, the Dagster-home helper and the
names every stage shares (split names, outcomes, key builders)."""
