"""House rules for rlhf_ray/algo: only torch + stdlib imports; docstrings, type hints, small files/functions."""

import ast
import sys
from pathlib import Path

import rlhf_ray.algo

ALGO_DIR = Path(rlhf_ray.algo.__file__).parent
FILES = sorted(ALGO_DIR.glob("*.py"))


def test_algo_imports_only_torch_and_stdlib():
    allowed = set(sys.stdlib_module_names) | {"torch"}
    assert FILES
    bad = []
    for path in FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            bad += [f"{path.name}:{node.lineno} imports {root}" for root in roots if root not in allowed]
    assert not bad, bad


def test_algo_modules_have_docstrings_and_stay_small():
    for path in FILES:
        source = path.read_text()
        tree = ast.parse(source)
        assert ast.get_docstring(tree), f"{path.name} needs a module docstring"
        assert len(source.splitlines()) < 400, path.name
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 60, f"{path.name}:{node.name}"
                where = f"{path.name}:{node.name}"
                args = [a for a in node.args.args + node.args.kwonlyargs if a.arg != "self"]
                assert node.returns and all(a.annotation for a in args), f"{where} must be fully typed"
                if not node.name.startswith("__"):  # dunders are covered by the class docstring
                    assert ast.get_docstring(node), f"{where} needs a docstring"
