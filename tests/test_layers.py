"""Layers import one way (README): a module may import only its own layer and the layers above it."""

import ast
from pathlib import Path

ORDER = [
    "placement",
    "plan",
    "cost",
    "comm",
    "boxing",
    "ops",
    "tensor",
    "checkpoint",
    "runtime",
    "graph",
    "embedding",
    "models",
    "testing",
    "demo",
    "train",
    "cli",
]
ROOT = Path(__file__).resolve().parents[1] / "shardflow"


def test_no_layer_imports_a_lower_one():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if len(rel) < 2 or rel[0] not in ORDER:
            continue
        mine = ORDER.index(rel[0])
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "shardflow" and len(parts) > 1 and parts[1] in ORDER:
                    if ORDER.index(parts[1]) > mine:
                        bad.append(f"{'/'.join(rel)} imports {name}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)
