"""llama.cpp's ``llama-server`` as a real upstream for the integration tests (``-m llamacpp``).

``scripts/llamacpp_setup.py`` builds the binary and generates the tiny model under
``third_party/llamacpp`` (or ``$SCER_LLAMACPP_DIR``). ``start_llama_server`` runs it on a free loopback
port and waits for ``/health``; ``LlamaServer.stop`` ends it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from scer_proxy.proxy.serving import free_port

ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = Path(os.environ.get("SCER_LLAMACPP_DIR", ROOT / "third_party" / "llamacpp"))
BINARY = Path(os.environ.get("SCER_LLAMA_SERVER", WORK_DIR / "build" / "bin" / "llama-server"))
MODEL_PATH = Path(os.environ.get("SCER_LLAMA_MODEL", WORK_DIR / "tiny-llama.gguf"))
ALIAS = "tiny-llama"
SLOTS = 4
CONTEXT = 8192  # shared among the slots: SLOTS prompts of up to CONTEXT // SLOTS tokens each
SETUP_HINT = "build it with `python scripts/llamacpp_setup.py` (about 6 minutes on 2 cores)"


def missing() -> str | None:
    """Why the server cannot run here, or None."""
    if not BINARY.is_file():
        return f"llama-server not found at {BINARY}"
    if not MODEL_PATH.is_file():
        return f"model not found at {MODEL_PATH}"
    return None


@dataclass
class LlamaServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """llama-server's Prometheus counters (``llamacpp:*``), by name without labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            match = re.match(r"^(llamacpp:[a-z_]+)(?:\{[^}]*\})?\s+(\S+)$", line)
            if match:
                out[match.group(1)] = float(match.group(2))
        return out

    def tokenize(self, text: str) -> list[int]:
        resp = httpx.post(f"{self.url}/tokenize", json={"content": text}, timeout=10)
        resp.raise_for_status()
        tokens: list[int] = resp.json()["tokens"]
        return tokens

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_llama_server(log_dir: Path, *, attempts: int = 3, ready_s: float = 30.0) -> LlamaServer:
    """Start llama-server on a free loopback port and wait until ``/health`` answers 200."""
    last = ""
    for attempt in range(attempts):
        port = free_port()
        log_path = log_dir / f"llama-server-{attempt}.log"
        cmd = [
            str(BINARY),
            "-m",
            str(MODEL_PATH),
            "--alias",
            ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-c",
            str(CONTEXT),
            "-np",
            str(SLOTS),
            "--metrics",
            "--slots",
            "-t",
            "1",
            "--seed",
            "1",
        ]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = LlamaServer(url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        server.stop()
        last = f"llama-server (exit {proc.returncode}) did not become healthy: {server.log_tail(5)}"
    raise RuntimeError(last)
