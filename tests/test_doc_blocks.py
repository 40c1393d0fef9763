"""Every Python block in README.md and docs/ runs as written.

A page's blocks run in order in one fresh interpreter, as a reader pasting
them would run them: later blocks may use what earlier ones defined. The
interpreter has 8 CPU devices, for the pages that build meshes.

A block that cannot run here says so, with its reason, in an HTML comment on
the line just before it (invisible on GitHub and in the built site):

    <!-- not run: needs a cluster of hosts -->

Names that a page leaves to the reader (their own params, a checkpoint
directory) come from a hidden block, which runs where it stands:

    <!-- setup
    params = {"w": jnp.ones((4, 4))}
    -->

Nothing else skips a block: every fence needs a language, and a Python
block without a `not run` comment runs.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PYTHON = {"python", "py", "python3"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*(\S*)")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:(.*?)-->\s*$")
SETUP = re.compile(r"^\s*<!--\s*setup\s*$")


def blocks(path):
  """The page's (line, kind, code) in order, kind in {"run", "setup",
  "not run"}; raises on a fence without a language or a stray marker."""
  lines = path.read_text().splitlines()
  out, i = [], 0
  pending = None                    # a `not run` comment waiting for its block
  while i < len(lines):
    line = lines[i]
    if SETUP.match(line):
      end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
      out.append((i + 2, "setup", "\n".join(lines[i + 1:end])))
      i = end + 1
      continue
    if m := NOT_RUN.match(line):
      if not m.group(1).strip():
        raise ValueError(f"{path.name}:{i + 1}: `not run` needs a reason")
      pending = (i + 1, m.group(1).strip())
      i += 1
      continue
    m = FENCE.match(line)
    if not m:
      if pending and line.strip():
        raise ValueError(f"{path.name}:{pending[0]}: `not run` is not just before a fence")
      i += 1
      continue
    indent, fence, lang = m.groups()
    if not lang:
      raise ValueError(f"{path.name}:{i + 1}: a fence without a language")
    end = next(j for j in range(i + 1, len(lines))
               if lines[j].strip().startswith(fence[0] * len(fence))
               and not lines[j].strip().strip(fence[0]))
    code = "\n".join(l[len(indent):] for l in lines[i + 1:end])
    if lang.lower() in PYTHON:
      out.append((i + 2, "not run" if pending else "run", code))
    elif pending:
      raise ValueError(f"{path.name}:{pending[0]}: `not run` before a {lang} block")
    pending = None
    i = end + 1
  return out


# A setup block's imports are its own: the page's blocks must import what
# they use themselves.
RUNNER = r"""
import json, sys, traceback, types
namespace = {"__name__": "__main__"}
for label, setup, code in json.loads(sys.stdin.read()):
  before = set(namespace)
  try:
    exec(compile(code, label, "exec"), namespace)
  except BaseException:
    traceback.print_exc()
    sys.exit(f"a block of {label} failed (the traceback gives its line)")
  if setup:
    for name in set(namespace) - before:
      if isinstance(namespace[name], types.ModuleType) or name.startswith("_"):
        del namespace[name]
"""


def test_every_python_block_is_run_or_says_why_not():
  found = {p.relative_to(REPO).as_posix(): blocks(p) for p in PAGES}
  runs = {page: sum(kind == "run" for _, kind, _ in b) for page, b in found.items()}
  # The README's quick start and the front page run; pages are not skipped
  # wholesale by a parser that finds nothing.
  assert runs["README.md"] >= 1 and runs["docs/index.md"] >= 1, runs
  assert sum(runs.values()) >= 10, runs


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(k == "run" for _, k, _ in blocks(p))],
    ids=lambda p: p.relative_to(REPO).as_posix())
def test_page_blocks_run(page, tmp_path):
  rel = page.relative_to(REPO).as_posix()
  # Padded to its place in the page, so a traceback gives the page's lines.
  chunks = [(rel, kind == "setup", "\n" * (line - 1) + code)
            for line, kind, code in blocks(page) if kind != "not run"]
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  # In an empty folder: whatever a block writes (checkpoints) lands there.
  result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(chunks),
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
