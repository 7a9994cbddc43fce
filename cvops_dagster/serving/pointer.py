"""The serving pointer: which runtime files are served, pinned by their SHA-256, checked against the history.

``production/serving.json`` names the runtime being served (``model_id``, ``dataset_version``,
``fp32_key``, ``fp32_sha256``, ``int8_key``, ``int8_sha256``). The publisher
(:mod:`cvops_dagster.serving.publication`) writes it from the replayed production history, after
the history event that published that runtime, through :func:`publish`, which loads every pinned
file with all the checks first.

Readers (``cvops predict``, ``cvops bench runtime``) go through :func:`serving_record`, which
cross-checks the pointer against the history's champion: it must pin exactly the runtime the last
publish event recorded (or, after events of the previous layout, which recorded none, name the
champion). :func:`open_production_predictor` also checks the model id and weights hash embedded in
the runtime file against the champion. A mismatch (a hand edit, an interrupted publish) is an
error naming both sides and the fix; so is a truncated or invalid ``serving.json``. The SHA-256
pins detect corruption and accidental edits, not deliberate tampering: they are not signatures.

Reading the pointer needs only the artifact storage and the history's JSON: no torch, no ``onnx``
(``publish`` imports it to check what it pins).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.registry.history import HASH_NOTE, REPUBLISH, ProductionStateError, Replay, read_record, replay_history
from cvops_dagster.serving.predictor import Predictor
from cvops_dagster.serving.runtime_file import RuntimeModelError

SERVING_KEY = "production/serving.json"
_FIELDS = ("model_id", "dataset_version", "fp32_key", "fp32_sha256", "int8_key", "int8_sha256")


@dataclass(frozen=True)
class ServingPointer:
    """The content of ``production/serving.json``.

    Attributes:
        model_id: the served model.
        dataset_version: the dataset its runtime was checked on.
        fp32_key: storage key of the FP32 runtime file.
        fp32_sha256: that file's SHA-256.
        int8_key: storage key of the INT8 runtime when its gate accepted it, else ``None``.
        int8_sha256: that file's SHA-256, else ``None``.
    """

    model_id: str
    dataset_version: str
    fp32_key: str
    fp32_sha256: str
    int8_key: str | None = None
    int8_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``production/serving.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: str) -> ServingPointer:
        """Read a pointer (``serving.json``, or a history event's ``runtime``).

        Raises:
            ProductionStateError: a field is missing or not text, naming ``where``.
        """
        bad = [k for k in ("model_id", "fp32_key", "fp32_sha256") if not isinstance(record.get(k), str)]
        bad += [k for k in ("int8_key", "int8_sha256") if not isinstance(record.get(k), (str, type(None)))]
        if bad:
            raise ProductionStateError(f"{where}: not a serving pointer (bad or missing {bad}); {REPUBLISH}")
        return cls(**{k: record.get(k) for k in _FIELDS})

    def files(self) -> list[tuple[str, str]]:
        """``(key, sha256)`` of every pinned runtime file."""
        pinned = [(self.fp32_key, self.fp32_sha256)]
        if self.int8_key is not None:
            if self.int8_sha256 is None:
                raise ValueError("an INT8 runtime is pinned by its SHA-256 too")
            pinned.append((self.int8_key, self.int8_sha256))
        return pinned

    def pins(self) -> tuple[tuple[str, str], ...]:
        """What identifies the served runtime: the model and every ``(key, sha256)``."""
        return (("model_id", self.model_id), *self.files())


def verify_runtime_files(storage: ArtifactStorage, pointer: ServingPointer, model_hash: str | None = None) -> None:
    """Load every file ``pointer`` pins with all the checks of
    :func:`~cvops_dagster.serving.runtime_checks.load_runtime_model` against its hash, and check
    what it says of itself: self-contained (the pin covers the one file), the pointer's model id,
    and ``model_hash`` (the weights SHA-256 of the model card) when given.

    Raises:
        RuntimeModelError: a pinned file is missing or refused, naming it and why.
    """
    # onnx loads here, in the step that publishes runtimes, never in `cvops predict`.
    from cvops_dagster.serving.runtime_checks import load_runtime_model

    for key, sha256 in pointer.files():
        if not storage.exists(key):
            raise RuntimeModelError(f"{storage.uri(key)}: pinned runtime file is missing")
        with local_copy(storage, key) as path:
            loaded = load_runtime_model(path, expected_sha256=sha256)
        if loaded.has_external_data:
            raise RuntimeModelError(f"{key}: holds external data; only self-contained runtime files are served")
        meta = loaded.metadata
        if meta.model_id != pointer.model_id or (model_hash is not None and meta.model_hash != model_hash):
            raise RuntimeModelError(
                f"{storage.uri(key)} embeds model {meta.model_id!r} (weights {meta.model_hash[:12]}), "
                f"not {pointer.model_id!r}{f' (weights {model_hash[:12]})' if model_hash else ''}"
            )


def publish(storage: ArtifactStorage, pointer: ServingPointer, model_hash: str | None = None) -> None:
    """Point serving at ``pointer``'s runtime files (``production/serving.json``, written atomically).

    Call it only once every blocking check on the runtime passed, and (in the lifecycle) only
    from the publisher, after the history event that records this runtime: until then the
    previous pointer, and the file hashes it pins, stay what ``cvops predict`` serves. Each pinned
    file is checked by :func:`verify_runtime_files` first, so a pinned hash always names bytes
    that passed those checks: the served path compares the hash instead of repeating them.

    Raises:
        RuntimeModelError: a pinned file is refused (nothing is written then).
    """
    verify_runtime_files(storage, pointer, model_hash)
    storage.write_json(SERVING_KEY, pointer.to_dict())


def read_pointer(storage: ArtifactStorage) -> ServingPointer | None:
    """``serving.json`` as written, without the history cross-check (``None`` when absent).

    Raises:
        ProductionStateError: the file is truncated or invalid, naming it and what to do.
    """
    if not storage.exists(SERVING_KEY):
        return None
    uri = storage.uri(SERVING_KEY)
    return ServingPointer.from_dict(read_record(storage, SERVING_KEY, remedy=REPUBLISH), uri)


def check_against_history(pointer: ServingPointer, history: Replay, where: str) -> None:
    """Refuse a pointer that is not what the production history published.

    With a champion whose runtime the history recorded, the pointer must pin exactly that runtime
    (model, keys and hashes). After events of the previous layout (no runtime recorded) it must
    name the champion. With no history at all there is nothing to check against.

    Raises:
        ProductionStateError: naming both sides and the fix.
    """
    champion = history.champion
    if champion is None:
        return
    if champion.runtime is None:
        if pointer.model_id != champion.model_id:
            raise ProductionStateError(
                f"{where} serves model {pointer.model_id}, but the production history's champion is "
                f"{champion.model_id} (event {champion.event_id}); {REPUBLISH}"
            )
        return
    recorded = ServingPointer.from_dict(champion.runtime, f"history event {champion.event_id}")
    if recorded.pins() != pointer.pins():
        raise ProductionStateError(
            f"{where} serves model {pointer.model_id} from {pointer.fp32_key} (sha256 {pointer.fp32_sha256[:12]}), "
            f"but the production history's last publish event {champion.event_id} published model "
            f"{recorded.model_id} from {recorded.fp32_key} (sha256 {recorded.fp32_sha256[:12]}); serving.json was "
            f"edited or a publish was interrupted. Refusing to serve it: {REPUBLISH}. ({HASH_NOTE}.)"
        )


def serving_record(storage: ArtifactStorage) -> dict[str, Any]:
    """The published runtime (``production/serving.json``), cross-checked against the history.

    Raises:
        FileNotFoundError: no runtime was published yet.
        ProductionStateError: ``serving.json`` or a history event is truncated or invalid, or the
            pointer is not what the history published.
    """
    pointer = read_pointer(storage)
    if pointer is None:
        raise FileNotFoundError("no production runtime yet (run `cvops run` first)")
    check_against_history(pointer, replay_history(storage), storage.uri(SERVING_KEY))
    return pointer.to_dict()


def production_runtime(storage: ArtifactStorage, int8: bool = False) -> tuple[str, str]:
    """Key and pinned SHA-256 of the runtime being served (see :func:`serving_record`).

    Raises:
        FileNotFoundError: no runtime was published yet, or no INT8 one was accepted.
        ProductionStateError: see :func:`serving_record`.
    """
    record = serving_record(storage)
    if int8 and not record.get("int8_key"):
        raise FileNotFoundError(f"production model {record['model_id']} has no accepted INT8 runtime")
    prefix = "int8" if int8 else "fp32"
    return record[f"{prefix}_key"], record[f"{prefix}_sha256"]


def open_production_predictor(storage: ArtifactStorage, int8: bool = False, intra_op_num_threads: int | None = None) -> Predictor:
    """A :class:`Predictor` on the served runtime: pinned by its hash, cross-checked against the
    history, and refused unless the model id (and weights hash, when the history recorded it)
    embedded in the file are the champion's.

    Raises:
        FileNotFoundError: no runtime was published yet, or no INT8 one was accepted.
        ProductionStateError: see :func:`serving_record`.
        RuntimeModelError: the file is not the pinned one, or embeds another model.
    """
    history = replay_history(storage)
    pointer = read_pointer(storage)
    if pointer is None:
        raise FileNotFoundError("no production runtime yet (run `cvops run` first)")
    check_against_history(pointer, history, storage.uri(SERVING_KEY))
    if int8 and pointer.int8_key is None:
        raise FileNotFoundError(f"production model {pointer.model_id} has no accepted INT8 runtime")
    key, sha256 = (pointer.int8_key, pointer.int8_sha256) if int8 else (pointer.fp32_key, pointer.fp32_sha256)
    assert key is not None and sha256 is not None
    with local_copy(storage, key) as path:
        # The pointer pins bytes that passed every check when published: the hash suffices.
        predictor = Predictor(path, expected_sha256=sha256, published=True, intra_op_num_threads=intra_op_num_threads)
    champion = history.champion
    expected_hash = champion.model_hash if champion is not None and champion.model_id == pointer.model_id else None
    meta = predictor.metadata
    if meta.model_id != pointer.model_id or (expected_hash is not None and meta.model_hash != expected_hash):
        raise RuntimeModelError(
            f"{storage.uri(key)} embeds model {meta.model_id!r} (weights {meta.model_hash[:12]}), but production serves "
            f"{pointer.model_id!r}{f' (weights {expected_hash[:12]})' if expected_hash else ''}; {REPUBLISH}. ({HASH_NOTE}.)"
        )
    return predictor


@contextmanager
def local_copy(storage: ArtifactStorage, key: str) -> Iterator[Path]:
    """A local path for ``key``: the file itself when storage is local, else a temporary copy
    (ONNX Runtime and the checker read files, not S3 objects)."""
    path = storage.local_path(key)
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="cvops-runtime-") as folder:
        copy = Path(folder) / Path(key).name
        copy.write_bytes(storage.read_bytes(key))
        yield copy
