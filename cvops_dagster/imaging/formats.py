"""Format detection by magic bytes, and PNG chunk checksums.

The format of an untrusted file comes from its first bytes, never from its name; only the
allow-listed formats are recognised. Pillow does not check the CRC of PNG image-data chunks
when it loads a file, so :func:`check_png_chunks` walks every chunk and checks its CRC.
"""

from __future__ import annotations

import struct
import zlib

from cvops_dagster.imaging.policy import REASON_CHECKSUM, REASON_TRUNCATED, DecodeFailure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_UINT32 = struct.Struct(">I")


def sniff_format(head: bytes) -> str | None:
    """The allow-listed format whose magic bytes start ``head``, else ``None``.

    Args:
        head: the first bytes of a file (16 are enough).

    Returns:
        Pillow's format name (``PNG``, ``JPEG``, ``GIF``, ``BMP``, ``TIFF``, ``WEBP``) or
        ``None`` for anything else, whatever its extension.
    """
    if head.startswith(PNG_MAGIC):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def check_png_chunks(data: bytes) -> bool:
    """Verify every PNG chunk's length and CRC up to IEND.

    Returns:
        ``True`` when the file holds only the critical chunks (IHDR, IDAT, IEND): a plain
        8-bit gray or RGB PNG of that kind can be its own canonical form.

    Raises:
        DecodeFailure: ``truncated`` when a chunk or IEND is missing, ``bad_checksum`` on a
            CRC mismatch.
    """
    view = memoryview(data)
    pos = len(PNG_MAGIC)
    only_critical = True
    while True:
        if pos + 8 > len(data):
            raise DecodeFailure(REASON_TRUNCATED, "PNG ends before IEND")
        (length,) = _UINT32.unpack_from(data, pos)
        chunk_type = data[pos + 4 : pos + 8]
        stop = pos + 12 + length
        if stop > len(data):
            raise DecodeFailure(REASON_TRUNCATED, f"PNG chunk {chunk_type!r} is cut short")
        (stored,) = _UINT32.unpack_from(data, stop - 4)
        if zlib.crc32(view[pos + 4 : stop - 4]) != stored:
            raise DecodeFailure(REASON_CHECKSUM, f"PNG chunk {chunk_type!r} fails its CRC")
        if chunk_type == b"IEND":
            return only_critical
        if chunk_type not in (b"IHDR", b"IDAT"):
            only_critical = False
        pos = stop
