"""The documentation builds, strictly (broken links and API references fail)."""

import subprocess
import sys

from conftest import REPO


def test_docs_build(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (tmp_path / "api" / "index.html").read_text().count("adam_spd") > 2
