"""Redraws the `cpu` presets' figures in docs/examples from the results the
pages link (docs/examples/results/vit_cpu.json and llm_cpu.json: the runs'
own tables, as their reports wrote them):

  python -m examples.redraw_doc_figures

A new run of a preset writes its figures itself (`--results-dir`); copy
those, and its tables into the JSON, instead.
"""

import json
import pathlib

from examples.llm import finetune as llm
from examples.vit import finetune as vit
from examples.vit.configs import PRESETS

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples"


def results(name: str) -> dict:
  return json.loads((DOCS / "results" / f"{name}.json").read_text())


def main():
  r = results("vit_cpu")
  summary, shifts = r["summary"], r["shifts_mean_over_seeds"]
  # The per-shift table has the means over seeds, one row per method.
  strength = {row["method"]: row["strength"] for row in summary}
  shift_names = [k for k in shifts[0] if k != "method"]
  shifts = [row | {"strength": strength[row["method"]]} for row in shifts]
  title = "ViT-S/14 on MNIST-5k, cpu preset"
  vit.plot_runs(r["runs"], title, DOCS / "vit_cpu.png")
  vit.plot_summary(summary, title, DOCS / "vit_cpu_summary.png")
  vit.plot_shifts(shifts, shift_names, title, DOCS / "vit_cpu_shifts.png")
  vit.plot_search(r["search"], strength, PRESETS["cpu"].n_val, title,
                  DOCS / "vit_cpu_search.png")

  rows = [{k: ("" if v is None else v) for k, v in row.items()}
          for row in results("llm_cpu")["runs"]]
  title = "SmolLM2-135M LoRA on KJV, cpu preset"
  llm.plot_perplexity(rows, "id_ppl", "ID perplexity (held-out chapters)", title,
                      DOCS / "llm_cpu.png")
  llm.plot_perplexity(rows, "pydoc_ppl", "pydoc perplexity (general text)", title,
                      DOCS / "llm_cpu_pydoc.png")


if __name__ == "__main__":
  main()
