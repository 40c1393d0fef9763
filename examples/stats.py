"""Paired bootstrap intervals for the examples' studies (pure numpy).

The study's design is crossed: every method is trained with the same seeds
and evaluated on the same test images. Both are random (another seed, or
another draw of test images, would give other numbers), so an interval on a
difference between two methods resamples both: each bootstrap replicate
draws seeds with replacement and, independently, test images with
replacement, and uses the *same* seeds and the same images for both methods
(the pairing), so what they share cancels.
"""

import numpy as np


def paired_bootstrap(a, b, *, strata=None, n_boot=10_000, level=0.95, seed=0,
                     chunk=1000) -> dict:
  """Mean of a - b over seeds and images, with a percentile bootstrap interval.

  Args:
    a, b: [seeds, images] per-image scores (1/0 for correct/wrong, or
      percentages), row s of both from seed s, column i from image i.
    strata: index arrays partitioning the image columns (e.g. one per OOD
      set); images are resampled within each stratum and the statistic is the
      mean over strata of the per-stratum mean, so the result is a mean of
      per-set accuracies however large each set is. None: one stratum.
    n_boot: bootstrap replicates.
    level: coverage of the interval (0.95: the 2.5 and 97.5 percentiles).

  Returns:
    {"diff": point estimate, "lo", "hi": interval ends, "excludes_zero"}.
  """
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if d.ndim != 2:
    raise ValueError(f"expected [seeds, images] scores, got shape {d.shape}")
  n_seeds, n_images = d.shape
  strata = [np.arange(n_images)] if strata is None else [np.asarray(s) for s in strata]
  point = float(np.mean([d[:, s].mean() for s in strata]))
  rng = np.random.default_rng(seed)
  reps = []
  for start in range(0, n_boot, chunk):
    m = min(chunk, n_boot - start)
    # Multinomial counts are the same as drawing indices with replacement,
    # and turn each replicate's mean into two small matrix products.
    seed_w = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=m)
    per_seed = np.zeros((m, n_seeds))
    for s in strata:
      img_w = rng.multinomial(len(s), np.full(len(s), 1 / len(s)), size=m)
      per_seed += img_w @ d[:, s].T / len(s)
    reps.append((seed_w * per_seed).sum(axis=1) / n_seeds / len(strata))
  reps = np.concatenate(reps)
  lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
  return {"diff": point, "lo": float(lo), "hi": float(hi),
          "excludes_zero": bool(lo > 0 or hi < 0)}


def binomial_halfwidth(acc_percent, n, z=1.96) -> float:
  """Half-width (in points) of the normal interval on an accuracy from n
  images: the error bar of a single run, from test-image sampling only."""
  p = np.clip(np.asarray(acc_percent) / 100, 0, 1)
  return float(z * np.sqrt(p * (1 - p) / n) * 100)
