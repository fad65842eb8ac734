"""W&B without a network: a bounded start-up check with an offline fallback, and a reader for the
history of an offline run.

Start-up (`online_or_reason`, used by ldm.utils.instantiate for `logger=wandb`): a run that would
log online first asks the server (`WANDB_BASE_URL`, default api.wandb.ai) whether it accepts the
API key, waiting at most `logger.wandb.init_timeout` seconds. No route, no answer or an error
answer (a bad key: HTTP 401) gives one warning line, and the run logs offline (the line names
`wandb sync DIR` to upload it later) and trains on; `logger.wandb.require_online=true` fails in
one line instead. Without such a check wandb itself retries for about two minutes and then stops
the run with a traceback.

Reader: the offline run file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1,
version 0) followed by LevelDB-log framed records (32 KiB blocks; each chunk has a 4-byte CRC, a
2-byte little-endian length and a 1-byte type FULL/FIRST/MIDDLE/LAST), each record a
`wandb_internal_pb2.Record`. Recent wandb releases no longer ship a Python reader, so tests and
notebooks use this one.
"""

from __future__ import annotations

import json
import netrc
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"
# (base url, api key) -> None (online) or the reason it is not; asked once per process
_PROBED: dict[tuple[str, str], str | None] = {}


def wandb_base_url() -> str:
    return (os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


def wandb_api_key(base_url: str) -> str | None:
    """The API key wandb would use: `WANDB_API_KEY`, else the netrc entry of the server's host."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        entry = netrc.netrc().authenticators(urlparse(base_url).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def probe_server(base_url: str, api_key: str, timeout: float) -> str | None:
    """None when the W&B server at `base_url` answers and accepts `api_key` within `timeout`
    seconds; otherwise the reason, in a few words."""
    import requests

    started = time.monotonic()
    try:
        response = requests.post(
            f"{base_url}/graphql",
            json={"query": "query Viewer { viewer { id } }"},
            auth=("api", api_key),
            timeout=(timeout, timeout),
        )
    except requests.exceptions.Timeout:
        return f"no answer from {base_url} within {timeout:g} s"
    except requests.exceptions.RequestException as err:
        detail = str(err.__context__ or err).split(": ")[-1][:80]
        return f"cannot reach {base_url} ({type(err).__name__}: {detail})"
    if response.status_code in (401, 403):
        return f"{base_url} refused the API key (HTTP {response.status_code})"
    if response.status_code >= 400:
        return f"{base_url} answered HTTP {response.status_code}"
    if time.monotonic() - started > timeout:
        return f"no answer from {base_url} within {timeout:g} s"
    return None


def online_or_reason(timeout: float) -> str | None:
    """None when W&B can log online now; otherwise why not (no key, no server, refused key)."""
    base_url = wandb_base_url()
    api_key = wandb_api_key(base_url)
    if not api_key:
        return "no W&B API key (WANDB_API_KEY or `wandb login`)"
    key = (base_url, api_key)
    if key not in _PROBED:
        _PROBED[key] = probe_server(base_url, api_key, timeout)
    return _PROBED[key]


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
