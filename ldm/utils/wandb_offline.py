"""Read the history of an offline W&B run (`wandb/offline-run-*/run-*.wandb`) without a server.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0) followed by
LevelDB-log framed records (32 KiB blocks; each chunk has a 4-byte CRC, a 2-byte little-endian
length and a 1-byte type FULL/FIRST/MIDDLE/LAST), each record a `wandb_internal_pb2.Record`.
Recent wandb releases no longer ship a Python reader, so tests and notebooks use this one.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[bytes]:
    """Yield the raw protobuf bytes of every record in a .wandb transaction log."""
    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{str(path)!r} is not a W&B transaction log (bad header)")
    pos, pending = len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:  # zero padding at the end of a block
            continue


def read_history(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(history rows as dicts of JSON values, run info {"group", "name", "config"}) of one run."""
    from wandb.proto import wandb_internal_pb2

    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for raw in iter_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "run":
            info.update(group=record.run.run_group, name=record.run.display_name)
        elif kind == "config":
            info.setdefault("config", {}).update(
                {item.key: json.loads(item.value_json) for item in record.config.update}
            )
    return rows, info
