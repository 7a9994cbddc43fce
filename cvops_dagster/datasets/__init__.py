"""Datasets: raw batches to one cleaned, deduplicated, split, versioned and validated dataset, and
loading a dataset version back into memory."""
