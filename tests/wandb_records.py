"""Read back what a W&B run logged, from its ``run-*.wandb`` record file (offline runs too).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
of chunks, each with a 7-byte header (checksum, little-endian length, type: full / first /
middle / last) and a piece of a serialized ``wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

__all__ = ["read_records", "history", "find_record_file"]

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_record_file(path: str | Path) -> Path:
    """``path`` itself if it is a ``.wandb`` file, else the one record file inside the run folder."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob("run-*.wandb")) or sorted(path.glob("*/run-*.wandb"))
    if not found:
        raise FileNotFoundError(f"no run-*.wandb record file in {path}")
    return found[-1]


def _chunks(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a W&B record file (missing ':W&B' header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if length == 0 and kind == 0:
            pos += left_in_block  # zero padding up to the next block
            continue
        body = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
            pending = b""


def read_records(path: str | Path):
    """All ``Record`` protobufs of a run, in order (``path``: run folder or ``.wandb`` file)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for body in _chunks(find_record_file(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(body)
        yield record


def history(path: str | Path) -> list[dict]:
    """Each ``wandb.log`` call as a dict of key -> decoded JSON value."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
