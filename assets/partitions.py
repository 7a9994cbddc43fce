"""Partitions shared by assets and sensors."""

from dagster import DynamicPartitionsDefinition

#: One partition per landing-zone batch, added by ``image_batches_sensor`` or ``cvops run``.
image_batches = DynamicPartitionsDefinition(name="image_batches")

#: One partition per complete production batch (``landing/production/<batch_id>/``), added by
#: ``production_batches_sensor`` or ``cvops run``.
production_batches = DynamicPartitionsDefinition(name="production_batches")
