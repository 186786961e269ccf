"""The ledger of request records.

This first ledger keeps records in memory (bounded, oldest dropped first, ``storage.memory_records``)
so that lookups and the summary work end to end; the durable SQLite ledger (WAL, one writer task,
batched inserts, migrations) replaces it behind the same methods in the carbon-and-ledger issue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from scer_proxy.records import Record


class MemoryLedger:
    def __init__(self, max_records: int = 100_000) -> None:
        self._records: OrderedDict[str, Record] = OrderedDict()
        self._max = max_records
        self.dropped = 0

    def put(self, record: Record) -> None:
        """Insert or replace (a settled figure replaces the response-time one)."""
        if record.request_id in self._records:
            self._records[record.request_id] = record
            return
        self._records[record.request_id] = record
        while len(self._records) > self._max:
            self._records.popitem(last=False)
            self.dropped += 1

    def get(self, request_id: str) -> Record | None:
        return self._records.get(request_id)

    def recent(self, limit: int) -> list[Record]:
        out: list[Record] = []
        for record in reversed(self._records.values()):
            if len(out) >= limit:
                break
            out.append(record)
        return out

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self._records.values()))

    def __len__(self) -> int:
        return len(self._records)
