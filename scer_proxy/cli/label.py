"""``scer-proxy label``: write a model's SCER label (SVG) and its manifest (YAML), from a running
proxy or from a bench submission file."""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import quote

from scer_proxy.cli.errors import USAGE, CliError, command, get, proxy_at
from scer_proxy.cli.rate import load_submission
from scer_proxy.scer import manifest
from scer_proxy.scer.book import published_csv
from scer_proxy.scer.manifest import Label
from scer_proxy.scer.rating import rate_submissions


def label_from_submission(path: str, model: str, base_url: str) -> Label:
    """The benchmark label of the submission in ``path``, under the configuration it ran with (its PUE,
    embodied figures and grid), rated against the published peers; its QR code links to
    ``{base_url}/scer/manifest/{model}.yaml?from=benchmark``, the proxy's manifest of the same submission."""
    submission = load_submission(path, "--submission")
    if submission.get("model") != model:
        raise CliError(f"{path} is a submission for {submission.get('model')!r}, not {model!r}", USAGE)
    try:
        rated = next(r for r in rate_submissions([submission], published_csv()) if not r.entry.published)
        return manifest.label_from_submission(submission, rated=rated, base_url=base_url)
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError(f"{path}: {exc}", USAGE) from None


@command("label")
def label_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    manifest_out = out.with_suffix(".yaml")
    if args.submission:
        label = label_from_submission(args.submission, args.model, args.base_url)
        svg, yaml = label.svg, label.yaml
    else:
        base = args.proxy.rstrip("/")
        name = quote(args.model, safe="")
        params = {"from": getattr(args, "figures_from", None) or "traffic"}
        token = getattr(args, "token", "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        svg = get(
            f"{base}/scer/label/{name}.svg", proxy_at(base), "--proxy", params=params, headers=headers
        ).text
        yaml = get(
            f"{base}/scer/manifest/{name}.yaml", proxy_at(base), "--proxy", params=params, headers=headers
        ).text
    try:
        out.write_text(svg, encoding="utf-8")
        manifest_out.write_text(yaml, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"--out: cannot write {out}: {exc.strerror}", USAGE) from None
    print(f"label written to {out}, manifest to {manifest_out}")
    return 0
