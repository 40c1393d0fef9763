"""Redraws the `cpu` presets' figures in docs/examples from the tables the
pages hold, which are the runs' own markdown tables (vit.md, vit_summary.md,
vit_shifts.md, vit_search.md; llm.md). The runs' JSON files were not kept,
so this is what the figures can be drawn from without running again:

  python -m examples.redraw_doc_figures

A new run of a preset writes its figures itself (`--results-dir`); copy
those instead.
"""

import pathlib

from examples.llm import finetune as llm
from examples.vit import finetune as vit
from examples.vit.configs import PRESETS

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples"


def tables(path) -> dict[tuple[str, ...], list[dict]]:
  """{header: rows} of every markdown table in the file, numbers as floats."""
  def value(cell):
    try:
      return float(cell)
    except ValueError:
      return cell
  lines = pathlib.Path(path).read_text().splitlines()
  out = {}
  for i, line in enumerate(lines[:-1]):
    if line.startswith("| ") and lines[i + 1].startswith("| ---"):
      head = tuple(c.strip() for c in line.strip("|").split("|"))
      rows = []
      for row in lines[i + 2:]:
        if not row.startswith("|"):
          break
        rows.append(dict(zip(head, (value(c.strip()) for c in row.strip("|").split("|")))))
      out[head] = rows
  return out


def main():
  t = tables(DOCS / "vit.md")
  runs = t["method", "strength", "seed", "val_acc", "id_acc", "ood_mean", "deviation"]
  summary = t["method", "strength", "seeds", "id_acc", "id_std", "ood_mean", "ood_std",
              "deviation"]
  shifts_head = next(h for h in t if h[0] == "method" and "sklearn_digits" in h)
  # vit_shifts.md has the means over seeds, one row per method.
  strength = {r["method"]: r["strength"] for r in summary}
  shifts = [r | {"strength": strength[r["method"]]} for r in t[shifts_head]]
  search = t["method", "strength", "seed", "val_acc", "deviation"]
  title = "ViT-S/14 on MNIST-5k, cpu preset"
  vit.plot_runs(runs, title, DOCS / "vit_cpu.png")
  vit.plot_summary(summary, title, DOCS / "vit_cpu_summary.png")
  vit.plot_shifts(shifts, list(shifts_head[1:]), title, DOCS / "vit_cpu_shifts.png")
  vit.plot_search(search, strength, PRESETS["cpu"].n_val, title, DOCS / "vit_cpu_search.png")

  rows = next(r for h, r in tables(DOCS / "llm.md").items()
              if h[:3] == ("method", "strength", "seed"))
  title = "SmolLM2-135M LoRA on KJV, cpu preset"
  llm.plot_perplexity(rows, "id_ppl", "ID perplexity (held-out chapters)", title,
                      DOCS / "llm_cpu.png")
  llm.plot_perplexity(rows, "pydoc_ppl", "pydoc perplexity (general text)", title,
                      DOCS / "llm_cpu_pydoc.png")


if __name__ == "__main__":
  main()
