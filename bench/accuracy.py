"""Accuracy of per-request energy against the simulator's ground truth: the whole error distribution.

Two measurements, side by side, for each profile and idle policy:
- ``http``: the simulator and the proxy as real servers on loopback, each in its own process, the
  workload through the official openai client; the proxy sees only HTTP and the DCGM-style counter
  (``bench.harness.accuracy``).
- ``replay``: the same attribution method on a virtual clock with no event-loop jitter
  (``bench.harness.replay``): the method's own error.

Workload (the energy issue's acceptance): 200 requests, 32 concurrent, half streamed, prompts of 20 to
2,000 tokens, outputs of 1 to 1,000 tokens. Errors are |proxy - truth| / truth per request; the
settled figure is the ledger's final one, the header figure the one sent with the response.

The scenario matrix (``bench.harness.scenarios``: open and closed loop, long prompts, bursts,
cancelled streams, two models, slow counters), one row a scenario: settled and header error
quantiles, the share of requests within their stated uncertainty (coverage), the median stated
bound over the median error, and attributed + idle against measured (conservation).

    python bench/accuracy.py                 # both profiles, both idle policies, http and replay
    python bench/accuracy.py --quick         # 8B only, replay + one http run
    python bench/accuracy.py --matrix        # every scenario on the replay (about 1 s each)
    python bench/accuracy.py --matrix --http --scenario closed-32 --time-scale 1   # ... and over HTTP
    python bench/accuracy.py --matrix --seed 11 --json matrix.json                 # another seed, saved
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness.accuracy import run_accuracy, run_scenario_http
from bench.harness.matrix import TARGETS, format_row, report_row, table_header
from bench.harness.replay import Workload, percentile, replay
from bench.harness.scenarios import REPORT_SEED, SCENARIOS, replay_scenario, scenario

QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def _row(label: str, errors: list[float]) -> str:
    values = [percentile(errors, q) for q in QUANTILES]
    return f"  {label:<22}" + "".join(f"{100 * v:>8.2f}" for v in values)


def _header() -> str:
    return f"  {'relative error, %':<22}" + "".join(
        f"{'p' + str(int(q * 100)) if q < 1 else 'max':>8}" for q in QUANTILES
    )


def _write_json(path: str, data: object) -> None:
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)


def run_matrix(args: argparse.Namespace) -> int:
    """One row a scenario on the replay, and with ``--http`` one over HTTP beside it."""
    try:
        chosen = [scenario(name) for name in args.scenario] if args.scenario else list(SCENARIOS)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    where = f"replay and http at {args.time_scale:g}x" if args.http else "replay"
    print(f"Accuracy matrix, seed {args.seed}, {where}\n")
    print(table_header(), flush=True)
    rows: list[dict[str, object]] = []
    for s in chosen:
        row = report_row(s.name, replay_scenario(s, args.seed))
        print(format_row(row), flush=True)
        rows.append(row.as_dict() | {"kind": "replay", "scenario": s.name})
        if args.http:
            report = asyncio.run(run_scenario_http(s, args.seed, time_scale=args.time_scale))
            row = report_row(f"{s.name} http", report)
            print(format_row(row), flush=True)
            rows.append(
                row.as_dict()
                | {"kind": "http", "scenario": s.name, "time_scale": args.time_scale, "wall_s": report.wall_s}
            )
    print(f"\n{TARGETS}")
    if args.json:
        _write_json(args.json, {"seed": args.seed, "rows": rows})
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="simulated seconds per real second (http)"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--matrix", action="store_true", help="the scenario matrix, one row a scenario")
    parser.add_argument("--http", action="store_true", help="with --matrix: each scenario over HTTP too")
    parser.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="NAME",
        help="with --matrix: only these (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=REPORT_SEED, help="with --matrix: the workloads' seed")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if args.matrix:
        return run_matrix(args)
    profiles = ["llama-3.1-8b-h100"] if args.quick else ["llama-3.1-8b-h100", "llama-3.1-70b-h100x4"]
    policies = ["separate"] if args.quick else ["separate", "amortize"]
    out: dict[str, dict[str, object]] = {}
    for profile in profiles:
        for idle in policies:
            print(f"\n{profile}, idle = {idle}, {args.requests} requests, {args.concurrency} concurrent")
            print(_header())
            rep = replay(
                profile, idle=idle, workload=Workload(requests=args.requests, concurrency=args.concurrency)
            )
            print(_row("replay settled", rep.errors("settled")))
            print(_row("replay header", rep.errors("header")))
            conservation = abs(rep.attributed_j + rep.idle_j - rep.measured_j) / rep.measured_j
            figures: dict[str, object] = {
                "replay": {
                    "settled": rep.errors("settled"),
                    "header": rep.errors("header"),
                    "conservation_rel": conservation,
                }
            }
            if not (args.quick and idle != "separate"):
                http = asyncio.run(
                    run_accuracy(
                        profile,
                        idle=idle,
                        time_scale=args.time_scale,
                        workload=Workload(requests=args.requests, concurrency=args.concurrency),
                    )
                )
                print(_row("http settled", http.errors("settled")))
                print(_row("http header", http.errors("header")))
                summary = http.summary()
                print(
                    f"  http: attributed + idle vs measured: {summary['conservation_rel']:.1e} relative; "
                    f"{summary['wall_s']:.1f} s wall at {args.time_scale:g}x"
                )
                figures["http"] = summary
            print(f"  replay: attributed + idle vs measured: {conservation:.1e} relative")
            out[f"{profile}/{idle}"] = figures
    print(
        "\nTargets (energy issue): settled median <= 5 %, p95 <= 15 %; header median <= 10 %; "
        "attributed + idle within 0.1 % of the counter."
    )
    if args.json:
        _write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
