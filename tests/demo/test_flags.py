"""demo.flags: a config dataclass's int and float fields as flags, and the config back."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from demo.flags import add_config_flags, config_from_flags


@dataclasses.dataclass(frozen=True)
class _Config:
  steps: int = 10
  lr: float = 1e-3
  channels: tuple[int, ...] = (16, 32)
  limit: int | None = None


def test_int_and_float_fields_become_typed_flags():
  parser = argparse.ArgumentParser()
  add_config_flags(parser, _Config)
  config = config_from_flags(_Config, parser.parse_args(["--steps", "7", "--lr", "2"]))
  assert config == _Config(steps=7, lr=2.0)
  assert isinstance(config.lr, float)
  assert config_from_flags(_Config, parser.parse_args([])) == _Config()
  with pytest.raises(SystemExit):
    parser.parse_args(["--channels", "8"])  # only int and float fields are flags
  with pytest.raises(SystemExit):
    parser.parse_args(["--steps", "0.5"])
