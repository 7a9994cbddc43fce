"""Dagster resources: the one place environment variables are bound."""
