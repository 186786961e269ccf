"""The ``bench``, ``rate`` and ``label`` commands: argument handling and output around the pure cores."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from scer_proxy.carbon.sci import Embodied
from scer_proxy.cli.main import UsageError
from scer_proxy.config import EMBODIED_PRESETS
from scer_proxy.scer.benchmark import BenchError, run_bench
from scer_proxy.scer.book import published_csv
from scer_proxy.scer.manifest import Label, inputs_from_totals, make_label
from scer_proxy.scer.rating import Rated, rate_submissions
from scer_proxy.web.labels import hardware_text


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def bench_command(args: argparse.Namespace) -> int:
    try:
        submission = asyncio.run(
            run_bench(
                args.target,
                args.model,
                workload_name=args.workload,
                concurrency=args.concurrency,
                requests=args.requests,
                repeats=args.repeats,
                task=args.task,
                params_b=args.params_b or 0.0,
            )
        )
    except BenchError as exc:
        text = str(exc)
        if text.startswith("--"):
            raise UsageError(f"scer-proxy bench: {text}") from None
        print(f"scer-proxy bench: {text}")
        return 1
    out = Path(args.out or f"scer-submission-{re.sub(r'[^A-Za-z0-9._-]+', '_', args.model)}.json")
    out.write_text(json.dumps(submission, indent=1) + "\n", encoding="utf-8")
    result = submission["result"]
    print(
        f"{submission['model']}  {submission['category']['task']} / {submission['category']['size_class']} / "
        f"{submission['hardware']['gpu_count']} x {submission['hardware']['gpu_model']}"
    )
    print(
        f"  {_fmt(result['j_per_1k_output_tokens'])} J ({_fmt(result['wh_per_1k_output_tokens'])} Wh) "
        f"per 1,000 output tokens, spread {100 * (result['spread_rel'] or 0):.1f} % over "
        f"{submission['workload']['repeats']} repeats; SCI {_fmt(result['sci_g_per_1k_output_tokens'])} "
        f"gCO2eq per 1,000 output tokens ({result['energy_source']})"
    )
    print(f"  submission written to {out}")
    if not args.no_submit:
        try:
            resp = httpx.post(f"{args.target.rstrip('/')}/scer/submissions", json=submission, timeout=30)
        except httpx.HTTPError as exc:
            print(f"  could not register it with the proxy: {exc}")
            return 1
        if resp.status_code == 201:
            rated = resp.json()
            print(
                f"  grade {rated['grade']} among {rated['peers']} peers"
                + (f" (percentile {rated['percentile']:.1f})" if rated["percentile"] is not None else "")
            )
        else:
            print(f"  the proxy refused the submission: HTTP {resp.status_code} {resp.text[:200]}")
            return 1
    return 0


def _load(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"scer-proxy rate: {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"scer-proxy rate: {path}: not a JSON submission ({exc.__class__.__name__})"
        ) from None
    if not isinstance(data, dict) or not {"model", "category", "result"} <= set(data):
        raise UsageError(f"scer-proxy rate: {path}: not a scer-proxy bench submission")
    return data


def rating_table(rated: list[Rated]) -> str:
    header = ["category", "entry", "kind", "J per 1k out", "rank", "N", "percentile", "grade"]
    rows = []
    for r in sorted(rated, key=lambda r: (str(r.entry.category), -(r.percentile or -1))):
        rows.append(
            [
                str(r.entry.category),
                r.entry.name,
                "published" if r.entry.published else "submission",
                _fmt(r.entry.j_per_1k_output_tokens),
                "-" if r.rank is None else str(r.rank),
                str(r.peers),
                "-" if r.percentile is None else f"{r.percentile:.1f}",
                r.grade,
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rate_command(args: argparse.Namespace) -> int:
    submissions = [_load(path) for path in args.files]
    try:
        rated = rate_submissions(submissions, published_csv(), quintiles=args.quintiles)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise UsageError(f"scer-proxy rate: malformed submission: {exc.__class__.__name__}: {exc}") from None
    print(rating_table(rated))
    scale = (
        "A to E by quintiles (--quintiles; not the SCER default)"
        if args.quintiles
        else "SCER 0.1: A above the 90th percentile, B from 60 to 90, C below 60"
    )
    print(
        f"\nMetric: GPU energy per 1,000 output tokens, lower is better; rank 1 is the worst. Scale: {scale}. "
        "Published peers: ML.ENERGY Leaderboard v3.0 at the batch size nearest the benchmark's concurrency."
    )
    return 0


def _label_from_submission(path: str, model: str, base_url: str) -> Label:
    submission = _load(path)
    if submission.get("model") != model:
        raise UsageError(
            f"scer-proxy label: {path} is a submission for {submission.get('model')!r}, not {model!r}"
        )
    repeats = submission.get("repeats") or []
    needed = (
        "energy_j",
        "carbon_operational_g",
        "carbon_embodied_g",
        "output_tokens",
        "started_at",
        "ended_at",
    )
    if not repeats or not all(all(k in r for k in needed) for r in repeats):
        raise UsageError(
            f"scer-proxy label: {path}: the submission lacks per-repeat energy and carbon figures"
        )
    hardware = submission["hardware"]
    preset = EMBODIED_PRESETS.get(str(hardware.get("gpu_model", "")).lower(), EMBODIED_PRESETS["h100"])
    embodied = Embodied(
        gpu_kg=float(preset["gpu_kg"]),
        server_kg=float(preset["server_kg"]),
        gpus_per_server=int(preset["gpus_per_server"]),
        lifetime_years=float(preset["lifetime_years"]),
        gpus_used=int(hardware.get("gpu_count", 1)),
    )
    started = min(float(r["started_at"]) for r in repeats)
    inputs = inputs_from_totals(
        energy_j=sum(float(r["energy_j"]) for r in repeats),
        carbon_operational_g=sum(float(r["carbon_operational_g"]) for r in repeats),
        carbon_embodied_g=sum(float(r["carbon_embodied_g"]) for r in repeats),
        output_tokens=sum(int(r["output_tokens"]) for r in repeats),
        hardware_s=sum(float(r.get("hardware_s") or 0.0) for r in repeats) or None,
        embodied=embodied,
        started_at=started,
        duration_s=max(float(r["ended_at"]) for r in repeats) - started,
        energy_source=str(submission["result"].get("energy_source", "")),
    )
    rated = next(r for r in rate_submissions([submission], published_csv()) if not r.entry.published)
    devices = hardware.get("devices") or []
    return make_label(
        model=model,
        task=str(submission["category"]["task"]),
        hardware=hardware_text([str(d) for d in devices])
        if devices
        else f"{hardware.get('gpu_count', 1)} x {hardware.get('gpu_model', 'GPU')}",
        inputs=inputs,
        scoring_date=str(submission.get("created_at", ""))[:10],
        grade=rated.grade,
        peers=rated.peers,
        percentile=rated.percentile,
        base_url=base_url,
    )


def label_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    manifest_out = out.with_suffix(".yaml")
    if args.submission:
        label = _label_from_submission(args.submission, args.model, args.base_url)
        svg, manifest = label.svg, label.yaml
    else:
        base = args.proxy.rstrip("/")
        name = quote(args.model, safe="")
        try:
            svg_resp = httpx.get(f"{base}/scer/label/{name}.svg", timeout=30)
            manifest_resp = httpx.get(f"{base}/scer/manifest/{name}.yaml", timeout=30)
        except httpx.HTTPError as exc:
            print(f"scer-proxy label: cannot reach {base}: {exc}")
            return 1
        if svg_resp.status_code != 200:
            print(f"scer-proxy label: the proxy answered HTTP {svg_resp.status_code}: {svg_resp.text[:200]}")
            return 1
        svg, manifest = svg_resp.text, manifest_resp.text
    try:
        out.write_text(svg, encoding="utf-8")
        manifest_out.write_text(manifest, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"scer-proxy label: --out: cannot write {out}: {exc.strerror}") from None
    print(f"label written to {out}, manifest to {manifest_out}")
    return 0
