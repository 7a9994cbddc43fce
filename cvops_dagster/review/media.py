"""Local files the FiftyOne App can show for content-addressed images in the artifact store.

FiftyOne reads media from local paths, and the App shows them in a browser. So:

- an image in a *local* artifact store whose format browsers show (PNG, JPEG, GIF, WebP, BMP)
  is used where it lies, never copied;
- otherwise (an S3 artifact root, or a format a browser cannot show: TIFF, PPM, ICO...) the
  image is cached once in the media folder under its content address: the bytes themselves for
  a browser format, or a PNG made by the cleaning decoder (allow-listed formats, pixel limit)
  for the others. A cached file is reused as long as it exists (its name is its content's hash,
  so it can never be stale); deleting the folder only costs the next build a download.

A file that does not decode keeps its raw bytes in the cache: the sample stays in the review
dataset (with its prediction), the App only cannot draw it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cvops_dagster.core.storage import ArtifactStorage
from cvops_dagster.imaging.decode import decode_image
from cvops_dagster.imaging.policy import DecodeConfig

logger = logging.getLogger(__name__)

#: Extensions of formats every browser shows.
BROWSER_FORMATS = frozenset({"png", "jpg", "jpeg", "gif", "webp", "bmp"})


@dataclass
class MediaCache:
    """Local paths for artifact-store images (see the module docstring).

    Attributes:
        storage: the artifact store the keys are in.
        root: the local media folder (created on first use).
        decode: limits of the decoder that converts non-browser formats.
    """

    storage: ArtifactStorage
    root: Path
    decode: DecodeConfig = DecodeConfig()
    downloaded: int = 0
    converted: int = 0

    def paths(self, keys: Sequence[str]) -> list[str]:
        """The local path of each key (``images/<sha256>.<ext>`` or ``canonical/<sha256>.png``), in order."""
        out: list[str | None] = [None] * len(keys)
        missing: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            ext = key.rsplit(".", 1)[-1].lower() if "." in key else ""
            local = self.storage.local_path(key) if self.storage.is_local else None
            if local is not None and ext in BROWSER_FORMATS:
                out[i] = str(local)
                continue
            target = self._target(key, ext)
            if target.exists():
                out[i] = str(target)
            else:
                missing.setdefault(key, []).append(i)
        if missing:
            self.root.mkdir(parents=True, exist_ok=True)
            keys_to_fetch = list(missing)
            for key, data in zip(keys_to_fetch, self.storage.read_many(keys_to_fetch), strict=True):
                ext = key.rsplit(".", 1)[-1].lower() if "." in key else ""
                target = self._target(key, ext)
                self._write(target, self._browser_bytes(key, ext, data))
                self.downloaded += 1
                for i in missing[key]:
                    out[i] = str(target)
        return [str(p) for p in out]

    def _target(self, key: str, ext: str) -> Path:
        stem = key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        folder = key.split("/", 1)[0] if "/" in key else "images"
        return self.root / folder / (f"{stem}.{ext}" if ext in BROWSER_FORMATS else f"{stem}.{ext or 'bin'}.png")

    def _browser_bytes(self, key: str, ext: str, data: bytes) -> bytes:
        if ext in BROWSER_FORMATS:
            return data
        import io

        try:
            image = decode_image(data, self.decode).image
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            self.converted += 1
            return buffer.getvalue()
        except Exception as exc:  # noqa: BLE001 - the sample stays; the App only cannot draw it
            logger.warning("review media: %s does not convert to PNG (%s: %s); raw bytes cached", key, type(exc).__name__, exc)
            return data

    @staticmethod
    def _write(target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
