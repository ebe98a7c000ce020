"""Imports run one way between our packages (docs/architecture.md):

    pallas_kernels <- svdq_jax <- models <- convert <- pipelines <- demo <- cli <- benchmarks

Every .py module of the packages and of benchmarks/ is parsed; each import of one of our packages,
at the top or inside a function, must name the module's own package or one below it, and sits at
the top of the module (only third-party imports may stay inside a function). Our modules
are never imported by a string: `importlib.import_module("models.flux")` (a literal, or a
module-level string constant) is a failure, except in a package's `__init__.py` resolving its own
submodules on first use (PEP 562 lazy exports, which keep `svdq_jax.errors` and
`convert.CheckpointReader` free of jax). tests/ and notebooks/ may import anything.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pallas_kernels", "svdq_jax", "models", "convert", "pipelines", "demo", "cli",
          "benchmarks")
RANK = {name: rank for rank, name in enumerate(LAYERS)}
# A string naming one of our modules: "models.flux", "models.flux:FluxTransformer", "convert".
_MODULE_STRING = re.compile(rf"^({'|'.join(LAYERS)})(\.\w+)*(:\w+)?$")
# Files that still import one of our modules by a string, each with the work that removes it.
# An entry that no longer violates is a failure too, so the list only shrinks.
PENDING: dict[str, str] = {}


def _layer_of(module: str) -> str | None:
  """The package (layer) a dotted module name belongs to; None for third-party modules."""
  top = module.split(".")[0]
  return top if top in RANK else None


def _function_level(tree: ast.AST) -> set[int]:
  """Line numbers of the import statements inside a function body."""
  return {node.lineno for fn in ast.walk(tree)
          if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
          for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}


def _imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
  """(line, absolute module name) of every import statement anywhere in the tree."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.extend((node.lineno, alias.name) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: inside the module's own package
        found.append((node.lineno, package))
      elif node.module:
        found.append((node.lineno, node.module))
  return found


def _string_imports(tree: ast.AST) -> list[tuple[int, str]]:
  """(line, name) of our modules named by a string where importlib could import them: the
  argument of an `import_module(...)` call (a literal, or a module-level constant), and, in a
  module that imports importlib, any string literal that names one of our modules."""
  constants = {}
  for node in getattr(tree, "body", []):
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(
        node.value.value, str):
      for target in node.targets:
        if isinstance(target, ast.Name):
          constants[target.id] = node.value.value
  uses_importlib = any(  # importlib itself or its import_module (not importlib.metadata)
      isinstance(node, ast.Import) and any(a.name == "importlib" for a in node.names)
      or isinstance(node, ast.ImportFrom) and node.module == "importlib"
      and any(a.name == "import_module" for a in node.names)
      for node in ast.walk(tree))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call) and node.args:
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
      if name == "import_module":
        arg = node.args[0]
        value = (arg.value if isinstance(arg, ast.Constant)
                 else constants.get(arg.id) if isinstance(arg, ast.Name) else None)
        if isinstance(value, str) and _MODULE_STRING.match(value):
          found.append((node.lineno, value))
    elif uses_importlib and isinstance(node, ast.Constant) and isinstance(node.value, str) and (
        _MODULE_STRING.match(node.value) and "." in node.value.split(":")[0]):
      found.append((node.lineno, node.value))
  return sorted(set(found))


def violations(source: str, path: str) -> list[str]:
  """Every wrong-way or by-string import of our packages in `source`, the text of the module at
  `path` (relative to the repository root, e.g. "models/flux.py")."""
  parts = Path(path).parts
  package = parts[0]
  if package not in RANK:
    return []
  is_init = parts[-1] == "__init__.py"
  tree = ast.parse(source, filename=path)
  problems = []
  local = _function_level(tree)
  for line, module in _imported_modules(tree, package):
    layer = _layer_of(module)
    if layer is not None and RANK[layer] > RANK[package]:
      problems.append(f"{path}:{line}: {package} imports {module} (a layer above it)")
    elif layer is not None and line in local:
      problems.append(f"{path}:{line}: imports our module {module} inside a function (imports of "
                      "our modules sit at the top)")
  for line, name in _string_imports(tree):
    target = _layer_of(name.split(":")[0])
    if is_init and target == package:
      continue  # a package resolving its own submodules lazily
    problems.append(f"{path}:{line}: imports our module {name!r} by a string")
  return problems


def _modules() -> list[Path]:
  return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def test_every_layer_is_there():
  assert all((ROOT / layer).is_dir() for layer in LAYERS)
  assert len(_modules()) > 50


def test_imports_run_one_way():
  problems = []
  for file in _modules():
    path = file.relative_to(ROOT).as_posix()
    found = violations(file.read_text(encoding="utf-8"), path)
    if path in PENDING:
      assert found, f"{path} no longer imports by a string: remove it from PENDING"
      assert all("by a string" in p for p in found), found
      continue
    problems.extend(found)
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source, path, expected", [
    ("from convert.loading import load_pretrained\n", "models/flux.py",
     "models imports convert.loading (a layer above it)"),
    ("def f():\n  import pipelines\n", "convert/api.py", "convert imports pipelines"),
    ("def f():\n  from cli import main\n", "demo/quality.py", "demo imports cli"),
    ("import benchmarks.kernels\n", "cli/main.py", "cli imports benchmarks.kernels"),
    ("import importlib\nm = importlib.import_module('convert.loading')\n", "models/t5.py",
     "our module 'convert.loading' by a string"),
    ("import importlib\nNAME = 'pallas_kernels.svdq_linear'\n"
     "def f():\n  return importlib.import_module(NAME)\n", "svdq_jax/dot.py",
     "our module 'pallas_kernels.svdq_linear' by a string"),
    ("import importlib\nTABLE = {'x': 'models.flux:FluxTransformer'}\n", "convert/registry.py",
     "our module 'models.flux:FluxTransformer' by a string"),
    ("import importlib\n_LAZY = {'x': 'models.flux'}\n", "svdq_jax/__init__.py",
     "our module 'models.flux' by a string"),
    ("def f():\n  from models import sharding\n", "pipelines/loop.py",
     "our module models inside a function"),
])
def test_a_wrong_way_import_is_found(source, path, expected):
  found = violations(source, path)
  assert found and all(expected in p for p in found), found


@pytest.mark.parametrize("source, path", [
    ("import jax\nfrom flax import nnx\nfrom svdq_jax import svdq_dot\n", "models/layers.py"),
    ("from models.flux import FluxTransformer\nfrom convert import api\n", "pipelines/flux.py"),
    ("from . import state\n", "convert/loading.py"),
    ("import pipelines\nfrom cli.main import main\n", "benchmarks/sampling.py"),
    ("import importlib\n_LAZY = {'convert': 'convert.api'}\n", "convert/__init__.py"),
    ("from pipelines import load_pipeline\n", "tests/test_anything.py"),
])
def test_a_right_way_import_passes(source, path):
  assert violations(source, path) == []
