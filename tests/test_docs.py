"""The documentation builds, strictly and without a single warning, and the
site it builds needs no network to be read; what the README states by hand
(signatures, the test command CI runs) is what the code and CI do."""

import ast
import inspect
import re
import subprocess
import sys

import spd_optax
from conftest import REPO


def test_docs_build(tmp_path):
  # Not -q: mkdocs logs warnings (griffe's among them) that strict mode does
  # not always turn into a failing exit code, so the log itself is checked.
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  log = result.stdout + result.stderr
  assert result.returncode == 0, log
  warnings = [line for line in log.splitlines()
              if re.match(r"\s*(WARNING|ERROR)\b", line)]
  assert not warnings, "\n".join(warnings)
  assert (tmp_path / "api" / "index.html").read_text().count("adam_spd") > 2

  # Offline: every script and stylesheet a page loads is part of the site.
  pages = sorted(tmp_path.rglob("*.html"))
  assert len(pages) >= 8
  for page in pages:
    html = page.read_text()
    remote = re.findall(r'<(?:script|link)[^>]*(?:src|href)="((?:https?:)?//[^"]*)"', html)
    assert not remote, (page.relative_to(tmp_path), remote)
  assert (tmp_path / "javascripts" / "mathjax" / "tex-svg.js").stat().st_size > 1e6
  assert "arithmatex" in (tmp_path / "algorithm" / "index.html").read_text()


def _written_signature(text, name):
  """Parameter names, kinds and defaults of `name(...)` as a table row of
  the text writes it, read as a Python def."""
  args = re.search(rf"^\| `{name}\(([^`]*)\)`", text, re.M).group(1)
  fn = ast.parse(f"def {name}({args}): pass").body[0].args
  positional = [a.arg for a in fn.args]
  defaults = dict(zip(positional[len(positional) - len(fn.defaults):],
                      map(ast.literal_eval, fn.defaults)))
  defaults |= {a.arg: ast.literal_eval(d) for a, d in zip(fn.kwonlyargs, fn.kw_defaults)}
  return positional, [a.arg for a in fn.kwonlyargs], defaults


def test_readme_signatures_are_the_code():
  readme = (REPO / "README.md").read_text()
  for fn in (spd_optax.adam_spd, spd_optax.selective_projection_decay):
    params = inspect.signature(fn).parameters.values()
    want = ([p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD],
            [p.name for p in params if p.kind is p.KEYWORD_ONLY],
            {p.name: p.default for p in params if p.default is not p.empty})
    assert _written_signature(readme, fn.__name__) == want, fn.__name__


def test_ci_runs_the_readme_test_command():
  readme = (REPO / "README.md").read_text()
  command = re.search(r"Run the tests[^\n]*\n\n```bash\n(.+)\n```", readme).group(1)
  assert "pytest" in command
  assert command in (REPO / ".ci" / "run").read_text().splitlines()
