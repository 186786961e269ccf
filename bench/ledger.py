"""Ledger throughput and summary latency: ``python bench/ledger.py [--records N] [--db FILE]``.

Puts N records (default 1,000,000; spread over 30 days, 3 models, 20 tenants) through the real
``put`` + writer path and reports inserts a second (until the last one is committed); then the
latency of ``summary()`` (all time, ``since=1h``, one model; p50 of a few runs), ``get`` and
``recent``. Targets: at least 5,000 inserts a second; a summary within 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scer_proxy.carbon.records import Record
from scer_proxy.ledger.sqlite import SqliteLedger

MODELS = ("llama-3.1-8b", "llama-3.1-70b", "qwen-2.5-7b")


def records(n: int, now: float) -> list[Record]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        energy = rng.uniform(5, 400)
        out.append(
            Record(
                request_id=f"scer-{i:012x}",
                model=MODELS[i % 3],
                upstream="local",
                tenant=f"key-{i % 20:04d}",
                endpoint="chat.completions",
                stream=bool(i & 1),
                started_at=now - 30 * 86400 * (1 - i / n),
                ended_at=now,
                status="ok",
                http_status=200,
                prompt_tokens=rng.randint(10, 2000),
                completion_tokens=rng.randint(1, 1000),
                token_source="upstream",
                energy_j=energy,
                energy_gpu_j=energy,
                energy_prefill_j=energy / 4,
                energy_decode_j=energy * 3 / 4,
                energy_source="nvml",
                energy_uncertainty_rel=0.08,
                hardware_s=1.0,
                carbon_g=energy * 0.1,
                carbon_operational_g=energy * 0.09,
                carbon_embodied_g=energy * 0.01,
                grid_intensity_g_per_kwh=369.0,
                grid_source="static:USA",
                sci=1.0,
                settled=True,
            )
        )
    return out


def p50_ms(fn: object, runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


async def bench(n: int, path: str) -> None:
    now = time.time()
    print(f"building {n:,} records ...", flush=True)
    batch = records(n, now)
    ledger = SqliteLedger(path, flush_interval_s=0.2, retention_days=3650)
    await ledger.open()
    try:
        t0 = time.perf_counter()
        for i in range(0, n, 10_000):
            for r in batch[i : i + 10_000]:
                ledger.put(r)
            if ledger.pending > ledger.max_pending // 2:  # the writer sets the pace; nothing is dropped
                await ledger.flush()
            await asyncio.sleep(0)
        assert await ledger.flush()
        elapsed = time.perf_counter() - t0
        assert len(ledger) == n and ledger.dropped == 0, (len(ledger), ledger.dropped)
        rate = n / elapsed
        print(
            f"inserts: {n:,} in {elapsed:.1f} s = {rate:,.0f} /s (target >= 5,000 /s)"
            f" {'OK' if rate >= 5000 else 'MISSED'}"
        )
        size_mb = await asyncio.to_thread(os.path.getsize, path) / 1e6
        print(f"database: {size_mb:,.0f} MB")
        for label, args in (
            ("all time", (None, None, None)),
            ("since=1h", (3600.0, None, None)),
            ("since=7d", (7 * 86400.0, None, None)),
            ("one model", (None, MODELS[1], None)),
            ("one tenant, 1d", (86400.0, None, "key-0007")),
        ):
            ms = p50_ms(lambda a=args: ledger.summary_sync(*a))  # type: ignore[misc]
            print(f"summary {label:>15}: p50 {ms:7.2f} ms (target <= 50 ms) {'OK' if ms <= 50 else 'MISSED'}")
        t0 = time.perf_counter()
        summary = await ledger.summary()
        print(
            f"summary (async, on a worker thread): {(time.perf_counter() - t0) * 1000:.2f} ms, "
            f"{summary['totals']['requests']:,} requests"
        )
        rng = random.Random(1)
        ids = [batch[rng.randrange(n)].request_id for _ in range(2000)]
        t0 = time.perf_counter()
        for rid in ids:
            assert ledger.get(rid) is not None
        print(f"get: {(time.perf_counter() - t0) / len(ids) * 1e6:.1f} us each")
        print(f"recent(100): p50 {p50_ms(lambda: ledger.recent(100)):.2f} ms")
        print(f"metrics rows: p50 {p50_ms(ledger.metrics_rows_sync, runs=3):.2f} ms")
    finally:
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--records", type=int, default=1_000_000, help="records to insert (default 1,000,000)"
    )
    parser.add_argument("--db", help="database file (default: a temporary one, removed after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scer-bench-") as tmp:
        asyncio.run(bench(args.records, args.db or os.path.join(tmp, "bench.db")))


if __name__ == "__main__":
    main()
