"""The import graph between scer_proxy's packages, checked against its layers.

Each package (or top-level module) of ``scer_proxy`` is a node; an edge A -> B means some module of
A imports B, at module level or inside a function. ``LAYERS`` lists the nodes from the bottom up:
a node may import only nodes of lower layers, so the graph has no cycle and no upward import.
``PURE`` are the packages that import no I/O library (checked by tests/test_layers.py).

    python scripts/import_graph.py          # prints the graph and any violation; exit 1 on one
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "scer_proxy"

# Bottom first; nodes on one line are peers and may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("__init__", "logs"),
    ("wire",),
    ("attribution",),
    ("carbon",),
    ("config",),
    ("summary", "scer"),
    ("meters", "grid", "ledger"),
    ("proxy",),
    ("web", "sim"),
    ("app",),
    ("cli",),
    ("__main__",),
]
PURE = ("config", "wire", "attribution", "carbon", "summary", "scer")
IO_MODULES = ("aiohttp", "httpx", "pynvml", "sqlite3", "socket", "asyncio", "requests")


def rank() -> dict[str, int]:
    return {node: i for i, layer in enumerate(LAYERS) for node in layer}


def node_of(module: str) -> str | None:
    """The node of a dotted module name inside the package, or None for anything outside it."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def modules(root: Path = ROOT) -> Iterator[tuple[str, Path]]:
    for path in sorted((root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1 and parts[:-1] != [PACKAGE]:
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(module: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every module name that ``module`` imports (absolute, relative ones resolved)."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target
            # ``from scer_proxy import wire`` imports the subpackage itself
            yield from (f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known)


def graph(root: Path = ROOT) -> dict[str, dict[str, set[str]]]:
    """node -> imported node -> the modules that import it."""
    edges: dict[str, dict[str, set[str]]] = {}
    found = dict(modules(root))
    for module, path in found.items():
        src = node_of(module)
        assert src is not None
        for target in imports(module, path, set(found)):
            dst = node_of(target)
            if dst is None or dst == src:
                continue
            edges.setdefault(src, {}).setdefault(dst, set()).add(module)
    return edges


def nodes(root: Path = ROOT) -> set[str]:
    """Every node of the tree under ``root``."""
    return {node for node in (node_of(m) for m, _ in modules(root)) if node}


def violations(edges: dict[str, dict[str, set[str]]], found: set[str]) -> list[str]:
    """Upward or sideways imports in ``edges``, and nodes in ``found`` that no layer names."""
    ranks = rank()
    out = []
    for src, targets in sorted(edges.items()):
        for dst, by in sorted(targets.items()):
            if src not in ranks or dst not in ranks:
                out.append(f"{src} -> {dst}: not in LAYERS")
            elif ranks[dst] >= ranks[src]:
                out.append(f"{src} -> {dst}: not a lower layer (in {', '.join(sorted(by))})")
    out.extend(f"{n}: not in LAYERS" for n in sorted(found - set(ranks)))
    return out


def main() -> int:
    edges = graph()
    ranks = rank()
    for layer in reversed(LAYERS):
        for src in layer:
            targets = sorted(edges.get(src, {}), key=lambda d: (-ranks.get(d, -1), d))
            print(f"{src:12} -> {', '.join(targets) if targets else '(nothing)'}")
    bad = violations(edges, nodes())
    for line in bad:
        print(f"violation: {line}", file=sys.stderr)
    print("no upward import, no cycle" if not bad else f"{len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
