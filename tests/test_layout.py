"""The layering rules of docs/architecture.md, read from the source with ``ast``: they fail the day
someone breaks them, so the tree keeps showing the data flow.

- ``formats``, ``units``, ``hardware`` (the contracts and the arithmetic at the bottom) import
  nothing from gpt2fit but ``errors`` (and hardware uses units).
- Nothing imports ``gpt2fit.train`` from outside ``train/`` (the train command and the bench live
  there; the CLI finds commands by name).
- No import cycles between gpt2fit's modules.
- Imports stand at module top, where a reader sees the dependency graph, except optional heavy
  packages that only one feature needs.
- No module over 600 lines; the package within its line budget.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gpt2fit"
MAX_MODULE_LINES = 600
MAX_PACKAGE_LINES = 7000
BOTTOM = {"gpt2fit.formats": {"gpt2fit.errors"}, "gpt2fit.units": {"gpt2fit.errors"},
          "gpt2fit.hardware": {"gpt2fit.errors", "gpt2fit.units"}, "gpt2fit.errors": set()}
# optional packages one feature needs: imported where used, so the rest works without them
LAZY_OK = {"bitsandbytes", "matplotlib", "tensorboard", "datasets", "lm_eval", "pyarrow", "pandas",
           "liger_kernel", "flash_attn", "wandb", "trackio", "deepspeed"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module top?, line) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body)
    for node in tree.body:  # `if TYPE_CHECKING:` / try-import blocks at top level count as top
        if isinstance(node, (ast.If, ast.Try)):
            top.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                pkg = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] if base.startswith("gpt2fit") else [base]
            out += [(n, id(node) in top, node.lineno) for n in names]
    return out


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imported, _, _ in imports(path):
            # `from gpt2fit.train import checkpoint` imports gpt2fit.train.checkpoint
            while imported and imported not in mods:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported.startswith("gpt2fit"):
                deps.add(imported)
        graph[name] = deps
    return graph


def test_bottom_modules_import_nothing_above_them():
    graph = internal_graph()
    for name, allowed in BOTTOM.items():
        extra = graph[name] - allowed - {"gpt2fit"}
        assert not extra, f"{name} imports {sorted(extra)}; it may import only {sorted(allowed)}"


def test_nothing_outside_train_imports_train():
    bad = [(name, dep) for name, deps in internal_graph().items() for dep in deps
           if dep.startswith("gpt2fit.train") and not name.startswith("gpt2fit.train")]
    assert not bad, f"imports of gpt2fit.train from outside train/: {bad}"


def test_no_import_cycles():
    graph = internal_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if d.startswith("gpt2fit") and d in graph and d != "gpt2fit":
                if state.get(d) == 1:
                    cycle = stack[stack.index(d):] + [d]
                    pytest.fail("import cycle: " + " -> ".join(cycle))
                if d not in state:
                    visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def test_imports_at_module_top_except_optional_packages():
    late = []
    for name, path in modules().items():
        for imported, at_top, line in imports(path):
            if not at_top and imported.split(".")[0] not in LAZY_OK:
                late.append(f"{path.relative_to(SRC.parent)}:{line} imports {imported}")
    assert not late, "imports inside functions hide the dependency graph:\n" + "\n".join(late)


def test_module_sizes_and_package_budget():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    big = {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
    assert sum(sizes.values()) <= MAX_PACKAGE_LINES, f"src/gpt2fit has {sum(sizes.values())} lines"


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above can fail: an import inside a function and a cycle are found in a sample."""
    sample = tmp_path / "gpt2fit" / "formats.py"
    sample.parent.mkdir()
    sample.write_text("import os\n\ndef f():\n    import json\n    from gpt2fit.train import loop\n")
    found = imports(sample)
    assert ("json", False, 4) in found and ("gpt2fit.train.loop", False, 5) in found and ("os", True, 1) in found
