"""Read back what a W&B run logged, from its ``run-*.wandb`` record file (offline runs too).
Test helper only.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
of chunks, each with a 7-byte header (checksum, little-endian length, type: full / first /
middle / last) and a piece of a serialized ``wandb_internal_pb2.Record``.

``wandb.finish()`` (wandb 0.31, wandb-core, offline) returns before the service has written the
run's records: on a busy machine the file can still hold only its 7-byte header right after
``finish()``. :func:`finish_run` finishes the run and shuts the service down (``wandb.teardown()``
returns once the service has exited, i.e. after it closed the record file); :func:`read_records`
also waits for the run's ``exit`` record, the last one the service writes, so a reader never
sees a half-written run. A reader can also catch the service in the middle of a chunk (its header
written, its body not yet): :func:`_chunks` stops before such a chunk, and the next poll reads it.
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Iterator

__all__ = ["finish_run", "read_records", "history", "find_record_file"]

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
        if pos + _HEADER + length > len(data):
            return  # the service is still writing this chunk: read the complete ones only
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


def finish_run() -> None:
    """Finish the current W&B run and wait until the service has written and closed its files."""
    import wandb

    wandb.finish()
    wandb.teardown()


def read_records(path: str | Path, timeout: float = 60.0):
    """All ``Record`` protobufs of a finished run, in order (``path``: run folder or ``.wandb``
    file). Waits up to ``timeout`` seconds for the run's ``exit`` record (the service writes the
    file asynchronously); raises TimeoutError naming the file if it never comes."""
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        records, data = [], find_record_file(path).read_bytes()
        for body in _chunks(data) if len(data) >= _HEADER else ():
            record = pb.Record()
            record.ParseFromString(body)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{find_record_file(path)} has no exit record after {timeout} s: the run was not "
                               "finished (call finish_run()) or its service has not written it")
        time.sleep(0.1)


def history(path: str | Path) -> list[dict]:
    """Each ``wandb.log`` call as a dict of key -> decoded JSON value."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
