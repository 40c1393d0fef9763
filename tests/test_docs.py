"""The documentation builds, strictly and without a single warning, and the
site it builds needs no network to be read."""

import re
import subprocess
import sys

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
