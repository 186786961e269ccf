"""The package's layers: imports only downward, and the pure packages import no I/O library.

Both rules are declared once, in ``scripts/import_graph.py`` (``LAYERS`` and ``PURE``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.servers import ROOT


def _import_graph() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRAPH = _import_graph()


def test_no_upward_import_and_no_cycle() -> None:
    assert GRAPH.violations(GRAPH.graph(), GRAPH.nodes()) == []


def test_every_node_is_in_a_layer() -> None:
    assert GRAPH.nodes() == set(GRAPH.rank())


def test_the_check_finds_an_upward_and_a_lazy_import(tmp_path: Path) -> None:
    pkg = tmp_path / "scer_proxy"
    for sub in ("wire", "proxy"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "wire" / "openai.py").write_text("def f():\n    from scer_proxy.proxy import handler\n")
    (pkg / "wire" / "tokens.py").write_text("from ..proxy.handler import x\n")
    (pkg / "proxy" / "handler.py").write_text("from scer_proxy.wire import openai\n")
    edges = GRAPH.graph(tmp_path)
    assert edges["wire"]["proxy"] == {"scer_proxy.wire.openai", "scer_proxy.wire.tokens"}
    assert edges["proxy"]["wire"] == {"scer_proxy.proxy.handler"}
    assert GRAPH.violations(edges, GRAPH.nodes(tmp_path)) == [
        "wire -> proxy: not a lower layer (in scer_proxy.wire.openai, scer_proxy.wire.tokens)"
    ]


@pytest.mark.parametrize("node", GRAPH.PURE)
def test_pure_package_imports_no_io(node: str) -> None:
    modules = sorted(m for m, _ in GRAPH.modules() if GRAPH.node_of(m) == node)
    assert modules, f"no module in {node}"
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        f"bad = sorted(m for m in {list(GRAPH.IO_MODULES)!r} if m in sys.modules)\n"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, f"{node} pulls in {out.stdout.strip()} {out.stderr[-500:]}"
