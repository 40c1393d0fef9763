"""The ViT example's data: MNIST-style framing of the typeset OOD digits and
the corruptions (no model, no downloads)."""

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")

from examples.vit import data  # noqa: E402


def test_every_font_draws_every_digit_framed_like_mnist():
  images, labels = data.load_font_digits(10 * len(data.FONT_FILES) * 2, seed=3)
  assert images.shape == (len(labels), 28, 28) and images.dtype == np.float32
  assert np.bincount(labels).tolist() == [len(labels) // 10] * 10
  assert images.min() >= 0 and images.max() <= 1
  for im in images:
    rows, cols = np.nonzero(im > 0.05)
    # The glyph fits a 20x20 box (MNIST's) and its centre of mass is the frame's.
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert height <= 21 and width <= 21 and max(height, width) >= 18
    assert np.allclose(ndimage.center_of_mass(im), (13.5, 13.5), atol=1.5)


def test_font_digits_are_deterministic_and_seeded():
  a, la = data.load_font_digits(50, seed=0)
  b, lb = data.load_font_digits(50, seed=0)
  c, _ = data.load_font_digits(50, seed=1)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("kind", data.CORRUPTIONS)
def test_corruptions_grow_with_severity(kind):
  images, _ = data.load_digits28(40)
  change = [np.abs(data.corrupt(images, kind, s) - images).mean() for s in (1, 3, 5)]
  assert 0 < change[0] < change[1] < change[2]
