"""Dagster assets: thin wrappers over cvops_dagster functions."""
