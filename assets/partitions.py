"""Partitions shared by assets and sensors."""

from dagster import DynamicPartitionsDefinition

#: One partition per landing-zone batch, added by ``image_batches_sensor`` or ``cvops run``.
image_batches = DynamicPartitionsDefinition(name="image_batches")
