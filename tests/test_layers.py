"""The layer order and the absence of import cycles, computed from the source with ``ast``.

Layers (an arrow = may import): server → explain → encoder; server → gallery;
explain → gallery (numpy-only helpers); research → encoder, gallery. Every
``import`` counts, at module level or inside a function, absolute or relative.

- gallery imports none of torch, encoder, explain, research, server;
- encoder imports none of explain, research, server, gallery;
- explain imports none of research, server;
- research does not import server; nothing outside server imports server
  (bench/ and tests/ are not walked);
- the client (client/phenolens) imports only its own modules and stubs, grpc,
  google.protobuf, numpy, the standard library, and PIL (its optional image extra).
- no import cycle between modules.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {  # top-level import name -> folder
    "encoder": "encoder",
    "gallery": "gallery",
    "explain": "explain",
    "research": "research",
    "server": "server",
    "phenolens": "client/phenolens",
}
FORBIDDEN = {  # importer's top-level package -> top-level names it must not import
    "gallery": {"torch", "encoder", "explain", "research", "server"},
    "encoder": {"explain", "research", "server", "gallery"},
    "explain": {"research", "server"},
    "research": {"server"},
}
CLIENT = "phenolens"
CLIENT_EXTERNALS = {"grpc", "google", "numpy", "PIL", "jinja2"}  # PIL, jinja2: the images extra


def module_files(root: Path, packages: Mapping[str, str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under each package folder."""
    out = {}
    for name, folder in packages.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            parts = [name, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imported_names(module: str, path: Path) -> Iterable[str]:
    """Every dotted name an import statement of the file names (``from a import b`` gives
    ``a.b``; the caller keeps its longest prefix that is a module: ``a.b`` or ``a``)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                keep = len(parts) - (node.level - 1)
                base = ".".join(parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                yield f"{base}.{alias.name}" if alias.name != "*" else base


def import_graph(root: Path, packages: Mapping[str, str]) -> tuple[dict[str, set[str]],
                                                                    dict[str, set[str]]]:
    """(module -> internal modules it imports, module -> external top-level names)."""
    files = module_files(root, packages)
    internal: dict[str, set[str]] = {m: set() for m in files}
    external: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for name in _imported_names(module, path):
            parts = name.split(".")
            target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                           if ".".join(parts[:i]) in files), None)
            if target is None:
                external[module].add(parts[0])
            elif target != module:
                internal[module].add(target)
    return internal, external


def layer_violations(internal: Mapping[str, set[str]],
                     external: Mapping[str, set[str]]) -> list[str]:
    out = []
    for module in sorted(internal):
        top = module.split(".")[0]
        names = {t.split(".")[0] for t in internal[module]} | external[module]
        if top == CLIENT:
            allowed = CLIENT_EXTERNALS | set(sys.stdlib_module_names) | {CLIENT}
            out += [f"{module} (client) imports {n}" for n in sorted(names - allowed)]
            continue
        bad = FORBIDDEN.get(top, set()) | ({"server"} if top != "server" else set())
        out += [f"{module} imports {n}" for n in sorted(names & bad)]
    return out


def import_cycles(internal: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(internal):
        if start in index:
            continue
        work = [(start, iter(sorted(internal[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(internal.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_tree_keeps_the_layer_order():
    internal, external = import_graph(ROOT, PACKAGES)
    assert len(internal) > 50  # the walk found the tree
    assert layer_violations(internal, external) == []


def test_no_import_cycle_between_modules():
    internal, _ = import_graph(ROOT, PACKAGES)
    assert import_cycles(internal) == []


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_planted_violations_and_cycles(tmp_path):
    _write(tmp_path, {
        "gallery/__init__.py": "",
        "gallery/store.py": "import numpy\n\ndef f():\n    import torch\n",
        "encoder/__init__.py": "",
        "encoder/spec.py": "def g():\n    from explain.attribution import engine\n",
        "explain/__init__.py": "",
        "explain/attribution/__init__.py": "",
        "explain/attribution/engine.py": "from . import methods\nfrom gallery.store import f\n",
        "explain/attribution/methods.py": "from .engine import x\n",
        "research/__init__.py": "",
        "research/train.py": "from server import app\n",
        "server/__init__.py": "",
        "server/app.py": "from explain.attribution import engine\nimport encoder.spec\n",
        "client/phenolens/__init__.py": "from . import client\n",
        "client/phenolens/client.py": "import grpc, json\nfrom ._proto import x\nimport torch\n",
        "client/phenolens/_proto/__init__.py": "",
    })
    internal, external = import_graph(tmp_path, PACKAGES)
    assert internal["explain.attribution.methods"] == {"explain.attribution.engine"}
    assert internal["encoder.spec"] == {"explain.attribution.engine"}  # inside a function
    assert "phenolens._proto" in internal["phenolens.client"]
    assert layer_violations(internal, external) == [
        "encoder.spec imports explain",
        "gallery.store imports torch",
        "phenolens.client (client) imports torch",
        "research.train imports server",
    ]
    assert import_cycles(internal) == [["explain.attribution.engine",
                                        "explain.attribution.methods"]]
    # The real layout passes: the same checker, no planted fault.
    _write(tmp_path, {"explain/attribution/methods.py": "", "encoder/spec.py": "",
                      "gallery/store.py": "import numpy\n", "research/train.py": "",
                      "client/phenolens/client.py": "import grpc\nfrom ._proto import x\n"})
    internal, external = import_graph(tmp_path, PACKAGES)
    assert layer_violations(internal, external) == [] and import_cycles(internal) == []


def test_explain_uses_no_private_captum_api():
    """captum's underscored modules and names are not its API: they change without notice."""
    private = []
    for module, path in module_files(ROOT, {"explain": "explain"}).items():
        for name in _imported_names(module, path):
            parts = name.split(".")
            if parts[0] == "captum" and any(p.startswith("_") for p in parts[1:]):
                private.append(f"{module} imports {name}")
    assert not private, private
