"""Ingestion: the landing zone (batches arriving as folders or S3 prefixes), copying a batch into
content-addressed storage with a manifest, and the bundled sample data. Nothing is decoded here."""
