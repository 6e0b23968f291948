"""Read a W&B offline run file (`run-<id>.wandb`): a LevelDB-style log of protobuf Records.

wandb no longer ships a Python reader, so the tests parse the format themselves: a 7-byte
header, then 32 KiB blocks of records, each with a 7-byte header (CRC32, length, type);
types FULL=1, FIRST=2, MIDDLE=3, LAST=4 chain a record across blocks.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024


def records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a finished run. W&B's service process writes the file on its own schedule, and
    run.finish() can return before it has (seen under load with two test workers): wait for the exit record."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = _parse(path)
        if (out and out[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _parse(path: Path) -> list:
    data = path.read_bytes()
    if len(data) < 7:
        return []  # not written yet
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # too little room for a header: the block is padded
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def run_config(path: Path) -> dict:
    config = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in items:
            config[item.key] = json.loads(item.value_json)
    return config


def history(path: Path) -> list[dict]:
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_id(path: Path) -> str:
    return next(r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run")
