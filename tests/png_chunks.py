"""Test helper: the chunk types of a PNG file, to check that no metadata chunk was written."""

from __future__ import annotations

import struct
from pathlib import Path


def png_chunks(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return chunks
