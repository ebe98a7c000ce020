"""svdq_jax.evaluation helpers used by the benchmark scripts."""

import argparse

import pytest

from svdq_jax.evaluation import parse_shapes


def test_parse_shapes_reads_in_by_out_pairs():
  assert parse_shapes("3072x3072,12288x3072") == [(3072, 3072), (12288, 3072)]
  assert parse_shapes("64x128") == [(64, 128)]


@pytest.mark.parametrize("text", ["", "3x", "3x4x5", "axb", "3072x3072,"])
def test_parse_shapes_refuses_malformed_text(text):
  with pytest.raises(argparse.ArgumentTypeError, match="must look like 3072x3072"):
    parse_shapes(text)
