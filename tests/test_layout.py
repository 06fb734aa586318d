"""The package's layering, read from the source with `ast` (nothing is imported).

- No import cycle among the modules of `xvila/` and `train/`, counting imports inside
  functions too; the only function-level imports of package modules are the documented
  hooks (`XVila.from_pretrained` / `save_pretrained` / `new_chat`, the package `__getattr__`),
  which are the deliberate back edges and so are left out of the cycle check.
- `xvila.fileio`, the I/O leaf, imports nothing of the package but `xvila.errors`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("xvila", "train")
DYNAMIC = "<importlib.import_module>"
# (module, enclosing function's qualified name) of the allowed lazy imports.
HOOKS = {
    ("xvila.model", "XVila.from_pretrained"),
    ("xvila.model", "XVila.save_pretrained"),
    ("xvila.model", "XVila.new_chat"),
    ("xvila", "__getattr__"),
}


def module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def resolve(name: str, modules: dict) -> str | None:
    """The package module `name` refers to (itself, or the package holding a name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str, path: Path, modules: dict) -> list[tuple[str, str | None]]:
    """(imported package module, enclosing function or None) for every import in `path`."""
    found = []
    is_package = path.name == "__init__.py"

    def visit(node, scope: list[str], in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, scope + [child.name], True)
            elif isinstance(child, ast.ClassDef):
                visit(child, scope + [child.name], in_function)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                where = ".".join(scope) if in_function else None
                for target in targets(child):
                    resolved = resolve(target, modules)
                    if resolved is not None and resolved != module:
                        found.append((resolved, where))
            elif isinstance(child, ast.Call) and dynamic(child):
                # importlib.import_module(name): which module is unknown; it counts as lazy.
                found.append((DYNAMIC, ".".join(scope) if in_function else None))
                visit(child, scope, in_function)
            else:
                visit(child, scope, in_function)

    def dynamic(call: ast.Call) -> bool:
        f = call.func
        return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
            isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:  # relative import
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself.
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]

    visit(ast.parse(path.read_text(), str(path)), [], False)
    return found


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Import edges without the hooks, and the lazy imports found outside them."""
    modules = module_files()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    stray = []
    for module, path in modules.items():
        for target, where in imports(module, path, modules):
            if where is not None and (module, where) in HOOKS:
                continue
            if where is not None:
                stray.append(f"{module}:{where} imports {target}")
            if target != DYNAMIC:
                edges[module].add(target)
    return edges, stray


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_scanner_sees_function_level_imports_and_cycles(tmp_path):
    # The checks below would pass vacuously if the scanner missed imports.
    modules = {"p": None, "p.a": None, "p.b": None}
    path = tmp_path / "a.py"
    path.write_text("import os\nfrom p import b\n\ndef f():\n    from p.b import x\n\n"
                    "class C:\n    def g(self):\n        from . import b\n"
                    "def h(name):\n    return importlib.import_module(name)\n")
    assert imports("p.a", path, modules) == [("p.b", None), ("p.b", "f"), ("p.b", "C.g"), (DYNAMIC, "h")]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_hooks_are_where_the_documented_lazy_imports_are():
    modules = module_files()
    found = {(m, where) for m, path in modules.items() for _, where in imports(m, path, modules) if where}
    assert HOOKS <= found


def test_no_import_cycle_and_no_lazy_imports_outside_the_hooks():
    edges, stray = graph()
    assert stray == [], "function-level imports of package modules outside the documented hooks"
    assert find_cycle(edges) is None


def test_the_io_leaf_imports_only_errors():
    edges, _ = graph()
    assert edges["xvila.fileio"] <= {"xvila.errors"}
    assert edges["xvila.errors"] == set()


# The README's table of modules as layers: a module imports only modules of lower layers.
LAYERS = [
    {"xvila.errors", "xvila.constants", "xvila.projections", "xvila.encoders", "xvila.decoders", "train",
     "xvila.encoders.clip_tokenizer", "xvila.toy", "train.toy"},
    {"xvila", "xvila.fileio", "xvila.encoders.imagebind", "xvila.conversation", "xvila.smollm", "xvila.resources",
     "xvila.toy.world"},
    {"xvila.config", "xvila.media", "xvila.toy.oracle", "train.toy.binding"},
    {"xvila.llm", "xvila.decoders.tiny", "xvila.decoders.controller", "train.checksums"},
    {"xvila.engine", "xvila.encoders.imagebind_preprocess", "xvila.encoders.imagebind_weights", "xvila.decoders.base",
     "train.data", "train.toy.corpus"},
    {"xvila.decoders.image", "xvila.decoders.video", "xvila.decoders.audio", "xvila.media_worker", "train.adapters",
     "train.builders"},
    {"xvila.model", "xvila.toy.parts"},
    {"xvila.chat", "xvila.checkpoint", "train.cache", "train.export", "xvila.evaluation.stats", "train.toy.bank"},
    {"xvila.evaluation.answers", "xvila.evaluation.captions", "xvila.evaluation.records", "xvila.evaluation.report",
     "xvila.evaluation.manifests", "xvila.evaluation.x2a", "train.toy.stages"},
    {"xvila.evaluation.understand", "xvila.evaluation.benchmark", "train.toy.base"},
    {"xvila.evaluation", "train.toy.measure"},
    {"xvila.evaluation.__main__"},
    {"train.batches"},
    {"train.phase3b"},
    {"train.phases"},
    {"train.loop"},
    {"train.__main__"},
    {"train.toy.data"},  # the toy recipe's data: the builders on the world corpus, pair and Q&A adapters
    {"train.toy.xvila"},  # the toy recipe: data, the four phases through `python -m train`, the export
    {"train.toy.scoring"},  # the toy results' referee: oracle scores of outputs, replies read for world words
    {"train.toy.results"},  # the toy's results command (evaluation runners + the oracle)
    {"train.toy.__main__"},
]


def test_every_module_imports_only_lower_layers():
    edges, _ = graph()
    layer = {m: i for i, ms in enumerate(LAYERS) for m in ms}
    assert set(layer) == set(edges), "a module is missing from LAYERS (and from the README's table)"
    upward = [f"{m} -> {t}" for m, ts in edges.items() for t in ts if layer[t] >= layer[m]]
    assert upward == []
