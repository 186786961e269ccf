"""Every command's failures, run as a real process: one line on stderr, nothing on stdout, exit 2 for
bad usage or configuration and 1 at run time, and the same words for the same failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scer_proxy.proxy.serving import free_port
from tests.servers import ROOT


def run_cli(*args: str) -> tuple[int, str, str]:
    """``python -m scer_proxy ARGS``: exit code, stdout, stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "scer_proxy", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def failure(command: str, code: int, *args: str) -> str:
    """Run a command that must fail with ``code``; returns its line without ``scer-proxy COMMAND: ``."""
    rc, out, err = run_cli(command, *args)
    assert (rc, out) == (code, ""), (rc, out, err)
    assert err.endswith("\n") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    prefix = f"scer-proxy {command}: "
    assert err.startswith(prefix), err
    return err[len(prefix) :].rstrip("\n")


def test_an_unreachable_proxy_is_exit_1_in_the_same_words(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    lines = {
        failure("bench", 1, "--target", url, "--model", "m"),
        failure("label", 1, "--model", "m", "--proxy", url, "--out", str(tmp_path / "l.svg")),
        failure("report", 1, "--proxy", url),
    }
    assert lines == {f"the proxy at {url}: unreachable (ConnectError: Connection refused)"}


def test_a_proxy_url_without_a_scheme_is_bad_usage(tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port()}"
    bench = failure("bench", 2, "--target", url, "--model", "m")
    label = failure("label", 2, "--model", "m", "--proxy", url, "--out", str(tmp_path / "l.svg"))
    report = failure("report", 2, "--proxy", url)
    assert bench.startswith("--target: ") and label.startswith("--proxy: ") and report.startswith("--proxy: ")
    assert (
        bench.removeprefix("--target: ")
        == label.removeprefix("--proxy: ")
        == report.removeprefix("--proxy: ")
    )


def test_a_missing_file_is_exit_2_in_the_same_words(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert failure("report", 2, "--db", missing) == f"--db: file not found: {missing}"
    assert failure("rate", 2, missing) == f"file not found: {missing}"
    assert (
        failure("label", 2, "--model", "m", "--submission", missing, "--out", str(tmp_path / "l.svg"))
        == f"--submission: file not found: {missing}"
    )
    assert failure("serve", 2, "--config", missing) == f"--config: file not found: {missing}"


def test_a_corrupt_database_is_exit_2_naming_the_flag_or_key(tmp_path: Path) -> None:
    corrupt = tmp_path / "scer.db"
    corrupt.write_bytes(b"not a database at all" * 100)
    report = failure("report", 2, "--db", str(corrupt))
    serve = failure("serve", 2, "--db", str(corrupt), "--listen", f"127.0.0.1:{free_port()}")
    assert report.startswith("--db: ") and "not a database" in report
    assert serve.startswith("storage.path: ") and "not a database" in serve


@pytest.mark.parametrize("content", ["{nope", "[1, 2]"])
def test_rate_refuses_what_is_not_a_submission(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert failure("rate", 2, str(path)).startswith(f"{path}: not a")


def test_serve_names_an_unknown_configuration_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[meter]\nintervals = 3\n")
    assert failure("serve", 2, "--config", str(path)).startswith("meter.intervals: unknown key")


def test_usage_errors_name_the_command(tmp_path: Path) -> None:
    assert failure("bench", 2, "--model", "m") == "the following arguments are required: --target"
    url = f"http://127.0.0.1:{free_port()}"
    assert failure("bench", 2, "--target", url, "--model", "m", "--workload", "nope").startswith(
        "--workload: unknown workload 'nope'"
    )
    assert failure("simulate", 2, "--profile", "nope").startswith("--profile: unknown profile")
    assert failure("demo", 2, "--listen", "bad") == "--listen: expected HOST:PORT, got 'bad'"


def test_error_lines_carry_no_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    """A message that quotes a name from elsewhere (a ledger, a server's answer) is printed escaped."""
    from scer_proxy.cli.errors import print_error

    print_error("scer-proxy report: model 'x\x1b[2J\x9b1m\u202ey' \r\n not found")
    err = capsys.readouterr().err
    assert err == "scer-proxy report: model 'x\\x1b[2J\\x9b1m\\u202ey' not found\n"
