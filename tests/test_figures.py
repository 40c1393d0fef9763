"""The examples' figures: what they plot, in words, one colour per method."""

import matplotlib
import matplotlib.container
import matplotlib.lines
import numpy as np
import pytest

matplotlib.use("Agg")

pytest.importorskip("flax")

from examples import common  # noqa: E402
from examples.llm import finetune as llm  # noqa: E402
from examples.vit import finetune as vit  # noqa: E402

COLUMN_NAMES = ("id_acc", "ood_mean", "deviation", "val_acc", "adapter_norm", "delta_w_norm",
                "_ppl", "_std")
SHIFTS = ["blur-1", "blur-3", "rotation-1", "rotation-3", "sklearn_digits"]


@pytest.fixture
def figures(monkeypatch):
  """The figures the plot functions draw, kept open instead of saved."""
  drawn = []
  for module in (vit, llm):
    monkeypatch.setattr(module, "save_figure", lambda fig, path: drawn.append(fig))
  yield drawn
  for fig in drawn:
    common.pyplot().close(fig)


def _runs():
  rng = np.random.default_rng(0)
  rows = []
  for method, strength in (("AdamW", 10.0), ("L2-SP", 1.0), ("Adam-SPD", 0.5)):
    for seed in range(3):
      rows.append({"method": method, "strength": strength, "seed": seed,
                   "val_acc": rng.uniform(80, 90), "id_acc": rng.uniform(80, 90),
                   "ood_mean": rng.uniform(50, 60), "deviation": rng.uniform(0.5, 5),
                   **{s: rng.uniform(10, 90) for s in SHIFTS}})
  return rows


def _texts(fig):
  return [t for ax in fig.axes for t in (ax.get_xlabel(), ax.get_ylabel(), ax.get_title())]


def _colors(ax):
  """label -> colour of every labelled line, scatter or error bar plot."""
  out = {}
  for artist in [*ax.lines, *ax.collections, *ax.containers]:
    label = artist.get_label()
    if label.startswith("_") or label == "chosen":
      continue
    if isinstance(artist, matplotlib.container.ErrorbarContainer):
      color = artist.lines[0].get_color()
    elif isinstance(artist, matplotlib.lines.Line2D):
      color = artist.get_color()
    else:
      color = artist.get_facecolor()[0]
    out[label] = matplotlib.colors.to_hex(color)
  return out


def _check_palette(fig):
  """Every method's artists have its colour: labelled ones by their label,
  the rest by the method their column's top panel is titled with."""
  want = lambda name: matplotlib.colors.to_hex(common.METHOD_COLORS[name])
  found = 0
  columns = {}
  for ax in fig.axes:
    if ax.get_title() in common.METHOD_COLORS:
      columns[ax.get_subplotspec().colspan.start] = ax.get_title()
  for ax in fig.axes:
    for label, color in _colors(ax).items():
      name = label.split(" (")[0]
      if name in common.METHOD_COLORS:
        assert color == want(name), (label, color)
        found += 1
    name = columns.get(ax.get_subplotspec().colspan.start)
    for line in ax.lines if name else ():
      assert matplotlib.colors.to_hex(line.get_color()) == want(name), name
      found += 1
  assert found


def test_vit_figures_say_what_they_plot(figures):
  runs = _runs()
  summary = vit.summarise([{**r, "key": r["method"], "ood": {s: r[s] for s in SHIFTS}}
                           for r in runs])
  vit.plot_runs(runs, "t", None)
  vit.plot_summary(summary, "t", None)
  vit.plot_shifts(runs, SHIFTS, "t", None)
  vit.plot_search([r for r in runs if r["seed"] == 0], {"AdamW": 10.0}, 250, "t", None)
  assert len(figures) == 4
  for fig in figures:
    for text in _texts(fig):
      assert not any(c in text for c in COLUMN_NAMES), text
    _check_palette(fig)
  runs_fig, summary_fig, shifts_fig, search_fig = figures
  assert "‖θ − θ₀‖" in runs_fig.axes[0].get_xlabel()
  assert all("%" in ax.get_ylabel() for ax in runs_fig.axes)

  # The summary's bars are the standard deviations over seeds.
  bars = summary_fig.axes[0].containers
  for container, row in zip(bars, summary):
    (xerr, yerr) = [np.asarray(c.get_segments()) for c in container.lines[2]]
    np.testing.assert_allclose(np.ptp(xerr[0][:, 0]) / 2, row["id_std"], rtol=1e-6)
    np.testing.assert_allclose(np.ptp(yerr[0][:, 1]) / 2, row["ood_std"], rtol=1e-6)

  # Per shift and severity: a panel per corruption, severity on x, the mean
  # over seeds on y; the sets without a severity beside them.
  titles = [ax.get_title() for ax in shifts_fig.axes if ax.get_visible()]
  assert titles == ["blur", "rotation", "other shifted sets"]
  blur = shifts_fig.axes[0]
  spd = next(c for c in blur.containers if c.get_label().startswith("Adam-SPD"))
  x, y = spd.lines[0].get_data()
  assert list(x) == [1, 3]
  np.testing.assert_allclose(
      np.asarray(y, float),
      [np.mean([r[s] for r in runs if r["method"] == "Adam-SPD"]) for s in ("blur-1", "blur-3")])

  # The search: the strengths are the ticks, one column per method.
  assert [t.get_text() for t in search_fig.axes[3].get_xticklabels()] == ["10"]


def test_llm_figure_and_the_shared_palette(figures):
  rows = [{"method": "pretrained", "strength": "", "delta_w_norm": 0.0, "id_ppl": 44.0},
          *({"method": m, "strength": s, "seed": seed, "delta_w_norm": 5.0 + seed,
             "id_ppl": 33.0 + seed} for m, s in (("adamw", 0.1), ("adam_spd", 1.0))
            for seed in range(2))]
  llm.plot_perplexity(rows, "id_ppl", "ID perplexity", "t", None)
  (fig,) = figures
  assert set(_colors(fig.axes[0])) == {"pre-trained", "AdamW (weight decay = 0.1) (2 seeds)",
                                      "Adam-SPD (λ = 1) (2 seeds)"}
  _check_palette(fig)
  for text in _texts(fig):
    assert not any(c in text for c in COLUMN_NAMES), text
  # The studies draw from the same palette.
  from examples.llm import study as llm_study
  from examples.vit import study as vit_study
  for study in (llm_study, vit_study):
    for key, name in study.NAMES.items():
      assert study.COLORS[key] == common.METHOD_COLORS[name]


def test_doc_figures_redraw_from_the_linked_results(tmp_path, monkeypatch):
  import shutil
  from examples import redraw_doc_figures
  shutil.copytree(redraw_doc_figures.DOCS / "results", tmp_path / "results")
  monkeypatch.setattr(redraw_doc_figures, "DOCS", tmp_path)
  redraw_doc_figures.main()
  drawn = sorted(p.name for p in tmp_path.glob("*.png"))
  assert drawn == ["llm_cpu.png", "llm_cpu_pydoc.png", "vit_cpu.png", "vit_cpu_search.png",
                   "vit_cpu_shifts.png", "vit_cpu_summary.png"]
