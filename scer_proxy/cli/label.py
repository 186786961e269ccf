"""``scer-proxy label``: write a model's SCER label (SVG) and its manifest (YAML), from a running
proxy or from a bench submission file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import quote

from scer_proxy.carbon.embodied import EMBODIED_PRESETS
from scer_proxy.carbon.sci import Embodied
from scer_proxy.cli.errors import USAGE, CliError, command, get, proxy_at
from scer_proxy.cli.rate import load_submission
from scer_proxy.scer.book import published_csv
from scer_proxy.scer.manifest import Label, inputs_from_totals, make_label
from scer_proxy.scer.rating import rate_submissions
from scer_proxy.web.labels import hardware_text

_REPEAT_KEYS = (
    "energy_j",
    "carbon_operational_g",
    "carbon_embodied_g",
    "output_tokens",
    "started_at",
    "ended_at",
)


def _embodied(hardware: dict[str, Any]) -> Embodied:
    """The preset of the submission's GPU model (the H100's when there is none), for its GPU count."""
    preset = EMBODIED_PRESETS.get(str(hardware.get("gpu_model", "")).lower(), EMBODIED_PRESETS["h100"])
    return Embodied(
        gpu_kg=float(preset["gpu_kg"]),
        server_kg=float(preset["server_kg"]),
        gpus_per_server=int(preset["gpus_per_server"]),
        lifetime_years=float(preset["lifetime_years"]),
        gpus_used=int(hardware.get("gpu_count", 1)),
    )


def label_from_submission(path: str, model: str, base_url: str) -> Label:
    submission = load_submission(path, "--submission")
    if submission.get("model") != model:
        raise CliError(f"{path} is a submission for {submission.get('model')!r}, not {model!r}", USAGE)
    repeats = submission.get("repeats") or []
    if not repeats or not all(all(k in r for k in _REPEAT_KEYS) for r in repeats):
        raise CliError(f"{path}: the submission lacks per-repeat energy and carbon figures", USAGE)
    hardware = submission["hardware"]
    started = min(float(r["started_at"]) for r in repeats)
    inputs = inputs_from_totals(
        energy_j=sum(float(r["energy_j"]) for r in repeats),
        carbon_operational_g=sum(float(r["carbon_operational_g"]) for r in repeats),
        carbon_embodied_g=sum(float(r["carbon_embodied_g"]) for r in repeats),
        output_tokens=sum(int(r["output_tokens"]) for r in repeats),
        hardware_s=sum(float(r.get("hardware_s") or 0.0) for r in repeats) or None,
        embodied=_embodied(hardware),
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


@command("label")
def label_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    manifest_out = out.with_suffix(".yaml")
    if args.submission:
        label = label_from_submission(args.submission, args.model, args.base_url)
        svg, manifest = label.svg, label.yaml
    else:
        base = args.proxy.rstrip("/")
        name = quote(args.model, safe="")
        svg = get(f"{base}/scer/label/{name}.svg", proxy_at(base), "--proxy").text
        manifest = get(f"{base}/scer/manifest/{name}.yaml", proxy_at(base), "--proxy").text
    try:
        out.write_text(svg, encoding="utf-8")
        manifest_out.write_text(manifest, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"--out: cannot write {out}: {exc.strerror}", USAGE) from None
    print(f"label written to {out}, manifest to {manifest_out}")
    return 0
