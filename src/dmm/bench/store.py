"""Durable bench results: one JSON line per finished cell, appended atomically.

Each record is written with a single `write` on a file opened for appending and then fsynced,
so a finished cell is on disk before the next one starts. A run killed in the middle of a write
can leave at most one torn last line; `ResultStore` drops it (and truncates it away before
appending, so the next record cannot be glued to it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dmm.errors import DMMError
from dmm.io import _json_default, write_text


class ResultStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.dropped = 0
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DMMError(f"cannot read bench results {self.path}: {e}") from e
        good: list[str] = []
        for line in text.splitlines(keepends=True):
            try:
                rec = json.loads(line)
                if not line.endswith("\n") or not isinstance(rec, dict) or "key" not in rec:
                    raise ValueError("incomplete record")
            except ValueError:
                self.dropped += 1  # a torn line from a killed run: that cell runs again
                continue
            good.append(line)
            self.records[rec["key"]] = rec
        if self.dropped:
            write_text(self.path, "".join(good))

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=_json_default, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = line.encode()
            while data:  # one write in practice; loop on a short write
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[record["key"]] = record
