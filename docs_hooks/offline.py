"""mkdocs hook: the site needs no network to be read.

- MathJax comes from the `django-static-mathjax` package on PyPI (in the
  `docs` extra; it ships MathJax 3 as plain static files, with MathJax's
  Apache-2.0 licence, and depends on nothing). The SVG build is one file
  that needs no web fonts, so nothing more is fetched when a page is read.
- Code is highlighted when the site is built, by Pygments
  (pymdownx.highlight), in place of the theme's highlight.js from a CDN; its
  stylesheet is written here rather than committed, so it always matches the
  installed Pygments.
"""

import importlib.util
import pathlib

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File
from pygments.formatters import HtmlFormatter

# Where the pages load them from (mkdocs.yml's extra_javascript, extra_css).
MATHJAX = "javascripts/mathjax"
PYGMENTS_CSS = "css/pygments.css"


def _mathjax_root():
  spec = importlib.util.find_spec("mathjax")
  for location in (spec.submodule_search_locations or []) if spec else []:
    root = pathlib.Path(location) / "static" / "mathjax"
    if (root / "es5" / "tex-svg.js").is_file():
      return root
  raise PluginError(
      "MathJax not found: install the docs extra (pip install -e '.[docs]'), "
      "which brings it as the django-static-mathjax package")


def on_files(files, config):
  root = _mathjax_root()
  for name, src in (("tex-svg.js", "es5/tex-svg.js"), ("LICENSE", "LICENSE")):
    files.append(File.generated(config, f"{MATHJAX}/{name}",
                                abs_src_path=str(root / src)))
  files.append(File.generated(
      config, PYGMENTS_CSS,
      content=HtmlFormatter(style="default").get_style_defs(".highlight")))
  return files
