"""Production batches in the landing zone: which are complete, what they hold, and two
fingerprints (the images', and the delayed labels') so a sensor tells new images from new labels.

A production batch is ``<landing>/production/<batch_id>/<file>``: image files at the top of the
batch folder, complete once ``_READY`` exists. The landing rules are those of labelled batches
(:func:`cvops_dagster.ingestion.landing.classify`): symlinks, hidden files, empty files, names
leaving the folder and anything in a subfolder (``in_subfolder``) are rejected with a reason,
nothing is lost. ``_READY`` and ``labels.csv`` are control files, not images: they are not
entries, so labels arriving or changing leave :attr:`ProductionBatch.fingerprint` (and the
predictions made for it) alone and change :attr:`ProductionBatch.labels_fingerprint` only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from cvops_dagster.ingestion.labels import LabelsParse, load_delayed_labels
from cvops_dagster.ingestion.landing import BatchEntry, LandingZone, entries_fingerprint


@dataclass(frozen=True)
class ProductionBatch:
    """One complete production batch as listed now.

    Attributes:
        batch_id: the batch folder's name.
        entries: every entry, classified (control files excluded), sorted by path.
        fingerprint: hash of the entries (paths, sizes, stamps, outcomes); blind to labels.csv.
        labels_fingerprint: stamp and size of ``labels.csv``, ``None`` when there is none.
    """

    batch_id: str
    entries: tuple[BatchEntry, ...]
    fingerprint: str
    labels_fingerprint: str | None

    @property
    def files(self) -> list[str]:
        """Paths of the accepted entries (the images to predict), sorted."""
        return [e.path for e in self.entries if e.accepted]

    @property
    def rejected(self) -> list[BatchEntry]:
        return [e for e in self.entries if not e.accepted]

    def rejected_reasons(self) -> dict[str, int]:
        return dict(sorted(Counter(str(e.reason) for e in self.rejected).items()))

    @property
    def run_key(self) -> str:
        return production_run_key(self.batch_id, self.fingerprint)


def production_run_key(batch_id: str, fingerprint: str) -> str:
    """The run key of a production batch's predictions: its id and the images' fingerprint
    (never the labels'), so new labels never request a new prediction."""
    return f"{batch_id}:{fingerprint}"


def list_production_batches(landing: LandingZone) -> list[str]:
    """Ids of the complete production batches (holding ``_READY``), sorted."""
    return landing.list_complete_batches(production=True)


def production_batch(landing: LandingZone, batch_id: str) -> ProductionBatch:
    """List one production batch: its classified entries and both fingerprints.

    Raises:
        ValueError: ``batch_id`` is not a plain folder name.
    """
    labels_fingerprint = landing.labels_fingerprint(batch_id)
    entries = tuple(landing.list_entries(batch_id, production=True))
    return ProductionBatch(batch_id, entries, entries_fingerprint(list(entries)), labels_fingerprint)


def production_batch_labels(
    landing: LandingZone, batch: ProductionBatch, label_set: set[str] | None
) -> LabelsParse | None:
    """The delayed labels of ``batch`` checked against its accepted files (and the model's
    label set when given); ``None`` when the batch has no ``labels.csv``. Never raises for
    what the file holds or is."""
    return load_delayed_labels(landing, batch.batch_id, set(batch.files), label_set)
