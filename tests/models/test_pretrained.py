"""`models.pretrained`: the loader hook every model's `from_pretrained` goes through. Models cannot
import convert; convert registers its loader, or the `svdq_jax.loaders` entry point names it."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from convert import loading
from models import pretrained

ROOT = Path(__file__).resolve().parents[2]


def test_importing_convert_loading_registers_its_loader():
  assert pretrained.registered_loader() is loading.load_pretrained


def test_the_entry_point_group_is_loaded_when_nothing_is_registered(monkeypatch):
  calls = []

  def loader(path, model_type, dtype=None):
    calls.append((path, model_type, dtype))
    return "model"

  class EntryPoint:
    name = "fake"

    def load(self):
      return loader

  groups = []

  def entry_points(*, group):
    groups.append(group)
    return [EntryPoint()]

  monkeypatch.setattr(pretrained, "_loaders", [])
  monkeypatch.setattr(pretrained.metadata, "entry_points", entry_points)
  assert pretrained.load_pretrained("some/folder", "flux", dtype="bf16") == "model"
  assert groups == ["svdq_jax.loaders"] and calls == [("some/folder", "flux", "bf16")]


def test_no_loader_at_all_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(pretrained, "_loaders", [])
  monkeypatch.setattr(pretrained.metadata, "entry_points", lambda *, group: [])
  with pytest.raises(RuntimeError, match="no checkpoint loader is registered"):
    pretrained.load_pretrained("some/folder", "flux")


def test_the_pyproject_entry_point_names_the_registered_loader():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  target = project["entry-points"][pretrained.LOADER_GROUP]["convert"]
  module, _, name = target.partition(":")
  assert getattr(sys.modules[module], name) is pretrained.registered_loader()


def test_a_program_importing_only_models_finds_the_loader(tmp_path):
  """In a fresh process that never imports convert, `from_pretrained`'s loader comes from the
  entry point. The entry point is declared by a dist-info folder on the path carrying the
  pyproject's entry (the shared test venv's install may predate it)."""
  dist = tmp_path / "svdq_jax_entry_point_probe-0.dist-info"
  dist.mkdir()
  (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: svdq-jax-entry-point-probe\n"
                                 "Version: 0\n")
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  entries = project["entry-points"][pretrained.LOADER_GROUP]
  (dist / "entry_points.txt").write_text(f"[{pretrained.LOADER_GROUP}]\n" + "".join(
      f"{name} = {target}\n" for name, target in entries.items()))
  code = ("import sys; from models import pretrained; from models.flux import FluxTransformer; "
          "assert not [m for m in sys.modules if m.split('.')[0] == 'convert']; "
          "loader = pretrained.registered_loader(); print(loader.__module__, loader.__name__)")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "convert.loading load_pretrained"
