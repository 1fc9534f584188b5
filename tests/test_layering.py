"""Layering and lean-import checks (like torchao's test_lean_import.py)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
    return names


def test_pipelines_and_kernels_never_import_ray_or_serve():
    for layer in ("pipelines", "kernels"):
        imported = _imported_modules(ROOT / layer)
        assert not {n for n in imported if n == "ray" or n.startswith("ray.")}, layer
        assert not {n for n in imported if n.startswith("shopreel.serve")}, layer
    source = "\n".join(p.read_text() for p in (ROOT / "pipelines").rglob("*.py"))
    assert "from ..serve" not in source


def test_training_code_never_imports_ray_or_serve():
    """train/ builds models from pipelines/ classes; it runs anywhere the stages run in process."""
    imported = _imported_modules(ROOT / "train")
    assert not {n for n in imported if n == "ray" or n.startswith("ray.") or n.startswith("shopreel.serve")}
    assert "from ..serve" not in "\n".join(p.read_text() for p in (ROOT / "train").rglob("*.py"))


def test_wire_format_knows_no_ray_or_stages():
    """serve/protocol.py is request/response types only: the ingress and job service depend on it."""
    tree = ast.parse((ROOT / "serve" / "protocol.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert not {n for n in imported if n == "ray" or n.startswith("ray.")}
    assert not imported & {".app", ".jobs", ".deployments", ".stage_clients", "fastapi"}
    code = "import sys, shopreel.serve.protocol; print([m for m in ('torch', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"the wire format pulled in: {out.stdout.strip()}"


def test_import_shopreel_is_lean():
    code = (
        "import sys, shopreel, shopreel.pipelines, shopreel.pipelines.types, shopreel.pipelines.config;"
        "heavy = [m for m in ('torch', 'ray', 'diffusers', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import shopreel pulled in: {out.stdout.strip()}"


def test_no_top_level_pipelines_or_kernels_module():
    """Nothing of ours answers to `pipelines`, `kernels` or `serve` (HF's `kernels` package may)."""
    repository = str(Path(__file__).resolve().parent.parent)
    keep = f"(s.origin or '').startswith({repository!r} + '/' + n + '/')"
    code = (
        "import importlib.util as u, shopreel;"
        "specs = [(n, u.find_spec(n)) for n in ('pipelines', 'kernels', 'serve')];"
        f"print([n for n, s in specs if s is not None and {keep}])"
    )
    # From elsewhere, and from the repository root itself (python -m puts the root on sys.path;
    # importing shopreel takes it off so that transformers' `import kernels` finds the real one).
    for cwd in ("/", repository):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd
        )
        assert out.stdout.strip() == "[]", cwd


def _pipelines_import_graph(folder: Path, package: str = "shopreel.pipelines") -> dict[str, set[str]]:
    """Each file of ``folder`` (the package ``package``) -> the files of it that it imports, from the AST.

    Counted: relative imports and absolute ``shopreel.pipelines...`` ones wherever they stand (module
    level, inside functions, under ``if TYPE_CHECKING``): the strict choice, since a lazy import that
    closes a loop still ties the two modules together. An import names the deepest module it reaches
    (``from .render import export`` -> ``render/export.py``; ``from .render import StreamingRenderer``
    -> ``render/__init__.py``); the parent packages Python initialises on the way are not counted, so
    a package's ``__init__`` may re-export submodules that import their siblings.
    """
    root = tuple(package.split("."))
    files: dict[tuple[str, ...], Path] = {}
    for path in folder.rglob("*.py"):
        parts = path.relative_to(folder).with_suffix("").parts
        files[parts[:-1] if parts[-1] == "__init__" else parts] = path
    graph: dict[str, set[str]] = {str(path.relative_to(folder)): set() for path in files.values()}
    for module, path in files.items():
        name = str(path.relative_to(folder))
        # The package relative imports start from: a package's __init__ is inside its own package.
        here = (*root, *(module if path.name == "__init__.py" else module[:-1]))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported = [tuple(alias.name.split(".")) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                start = tuple(node.module.split(".")) if node.module else ()
                if node.level:
                    start = (*here[: len(here) - node.level + 1], *start)
                imported = [(*start, alias.name) for alias in node.names]
            else:
                continue
            for parts in imported:
                if parts[: len(root)] != root:
                    continue
                inside = parts[len(root) :]
                while inside not in files and inside:
                    inside = inside[:-1]  # a name defined in a module, not a module: that module
                target = str(files[inside].relative_to(folder)) if inside in files else None
                if target is not None and target != name:
                    graph[name].add(target)
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_pipelines_import_graph_is_acyclic():
    graph = _pipelines_import_graph(ROOT / "pipelines")
    assert "types.py" in graph["generate.py"]  # the graph is really read
    cycle = _a_cycle(graph)
    assert cycle is None, "import cycle in pipelines/: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_lazy_and_type_checking_imports(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "sub" / "__init__.py").write_text("from .a import A\n")
    (tmp_path / "sub" / "a.py").write_text("def f():\n    from .b import B\n")
    (tmp_path / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from shopreel.pipelines.c import C\n"
    )
    (tmp_path / "c.py").write_text("from .sub import a\n")
    cycle = _a_cycle(_pipelines_import_graph(tmp_path))
    assert cycle == ["c.py", "sub/a.py", "sub/b.py", "c.py"]
