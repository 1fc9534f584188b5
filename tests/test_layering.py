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
    code = (
        "import importlib.util as u;"
        "print([n for n in ('pipelines', 'kernels', 'serve') if u.find_spec(n) is not None])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"
