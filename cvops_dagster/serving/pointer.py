"""The serving pointer: which runtime files are served, pinned by their SHA-256.

``production/serving.json`` names the runtime being served (``model_id``, ``dataset_version``,
``fp32_key``, ``fp32_sha256``, ``int8_key``, ``int8_sha256``). :func:`publish` switches it, and only
:func:`cvops_dagster.serving.build.build_runtimes` calls that, after parity held; ``cvops
predict`` and ``cvops bench runtime`` read it (:func:`production_runtime`) and load exactly the
pinned file, so a failed or tampered re-export is refused rather than served. Reading the
pointer needs only the artifact storage: no torch, no ``onnx`` (``publish`` imports it to check
what it pins).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.serving.runtime_file import RuntimeModelError

SERVING_KEY = "production/serving.json"


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

    def files(self) -> list[tuple[str, str]]:
        """``(key, sha256)`` of every pinned runtime file."""
        pinned = [(self.fp32_key, self.fp32_sha256)]
        if self.int8_key is not None:
            if self.int8_sha256 is None:
                raise ValueError("an INT8 runtime is pinned by its SHA-256 too")
            pinned.append((self.int8_key, self.int8_sha256))
        return pinned


def publish(storage: ArtifactStorage, pointer: ServingPointer) -> None:
    """Point serving at ``pointer``'s runtime files (``production/serving.json``, written atomically).

    Call it only once every blocking check on the runtime passed: until then the previous
    pointer, and the file hashes it pins, stay what ``cvops predict`` serves. Each pinned file
    is loaded here with every check of
    :func:`~cvops_dagster.serving.runtime_checks.load_runtime_model` against its hash, and must
    hold no external data (the pin covers the one file only), so a pinned hash always names
    bytes that passed those checks: the served path compares the hash instead of repeating them.

    Raises:
        RuntimeModelError: a pinned file is refused (nothing is written then).
    """
    # onnx loads here, in the step that builds runtimes, never in `cvops predict`.
    from cvops_dagster.serving.runtime_checks import load_runtime_model

    for key, sha256 in pointer.files():
        with local_copy(storage, key) as path:
            loaded = load_runtime_model(path, expected_sha256=sha256)
        if loaded.has_external_data:
            raise RuntimeModelError(f"{key}: holds external data; only self-contained runtime files are served")
    storage.write_json(SERVING_KEY, pointer.to_dict())


def serving_record(storage: ArtifactStorage) -> dict[str, Any]:
    """The published runtime (``production/serving.json``), as a dict.

    Raises:
        FileNotFoundError: no runtime was published yet.
    """
    if not storage.exists(SERVING_KEY):
        raise FileNotFoundError("no production runtime yet (run `cvops run` first)")
    return storage.read_json(SERVING_KEY)


def production_runtime(storage: ArtifactStorage, int8: bool = False) -> tuple[str, str]:
    """Key and pinned SHA-256 of the runtime being served.

    Raises:
        FileNotFoundError: no runtime was published yet, or no INT8 one was accepted.
    """
    record = serving_record(storage)
    if int8 and not record.get("int8_key"):
        raise FileNotFoundError(f"production model {record['model_id']} has no accepted INT8 runtime")
    prefix = "int8" if int8 else "fp32"
    return record[f"{prefix}_key"], record[f"{prefix}_sha256"]


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
