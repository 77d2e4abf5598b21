"""The arrows of the layout: omni_model/ is pure PyTorch (no Ray, no torch.distributed);
serve/ and pipelines/ stand on omni_model/ beside each other (neither imports the other,
nor jobs/ or benchmarks/); library code does not print."""

import ast

from tests.conftest import ROOT


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_omni_model_imports_no_ray_and_no_distributed():
    files = sorted((ROOT / "omni_model").rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            assert not name.startswith(("ray", "torch.distributed", "deepspeed", "pipelines",
                                        "jobs", "serve")), f"{path.name} imports {name}"


def test_serve_and_pipelines_import_neither_each_other_nor_the_jobs():
    rules = {"serve": ("pipelines", "jobs", "benchmarks"), "pipelines": ("serve", "jobs", "benchmarks")}
    for package, refused in rules.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files
        for path in files:
            for name in _imports(path):
                assert name.split(".")[0] not in refused, f"{path.relative_to(ROOT)} imports {name}"


def test_library_code_does_not_print():
    for package in ("omni_model", "pipelines", "serve"):
        for path in (ROOT / package).rglob("*.py"):
            calls = [n for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
            assert not calls, f"{path} calls print()"
