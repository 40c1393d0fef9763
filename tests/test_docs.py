"""The documentation builds, strictly and without a single warning, and the
site it builds needs no network to be read; its links and anchors resolve;
the API reference renders every docstring whole, each Returns as one row;
the home page installs and trains; what the README states by hand
(signatures, the test command CI runs) is what the code and CI do; and the
repository's text speaks of the project, not of how it was worked on."""

import ast
import html
import html.parser
import inspect
import pkgutil
import posixpath
import re
import subprocess
import sys
import urllib.parse

import pytest

import spd_optax
from conftest import REPO


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """The site, built once for this module's tests: (folder, build log)."""
  out = tmp_path_factory.mktemp("site")
  # Not -q: mkdocs logs warnings (griffe's among them) that strict mode does
  # not always turn into a failing exit code, so the log itself is checked.
  result = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  log = result.stdout + result.stderr
  assert result.returncode == 0, log
  return out, log


def test_docs_build(site):
  out, log = site
  warnings = [line for line in log.splitlines()
              if re.match(r"\s*(WARNING|ERROR)\b", line)]
  assert not warnings, "\n".join(warnings)

  # Offline: every script and stylesheet a page loads is part of the site.
  pages = sorted(out.rglob("*.html"))
  assert len(pages) >= 8
  for page in pages:
    text = page.read_text()
    remote = re.findall(r'<(?:script|link)[^>]*(?:src|href)="((?:https?:)?//[^"]*)"', text)
    remote = [url for url in remote if 'rel="canonical"' not in text.split(url)[0][-200:]]
    assert not remote, (page.relative_to(out), remote)
  assert (out / "javascripts" / "mathjax" / "tex-svg.js").stat().st_size > 1e6
  assert "arithmatex" in (out / "algorithm" / "index.html").read_text()


class _Page(html.parser.HTMLParser):
  """A page's links, element ids, unknown tags and text."""

  # Every element the theme, Markdown and mkdocstrings write. A docstring's
  # `<g_t, θ>` read as HTML shows up as a tag outside this list.
  KNOWN = set("""a abbr b blockquote body br button caption code col colgroup dd
      del details div dl dt em figcaption figure footer form h1 h2 h3 h4 h5 h6
      head header hr html i img input kbd label li link main mark meta nav
      noscript ol option p path pre s script section select small span strong
      style sub summary sup svg table tbody td textarea tfoot th thead title tr
      u ul""".split())

  def __init__(self, text):
    super().__init__()
    self.links, self.ids, self.unknown, self.words = [], set(), [], []
    self._skip = 0
    self.feed(text)
    self.text = html.unescape(" ".join(self.words))

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag not in self.KNOWN:
      self.unknown.append(self.get_starttag_text())
    if "id" in attrs:
      self.ids.add(attrs["id"])
    for key in ("href", "src"):
      if attrs.get(key) and tag in ("a", "img", "script", "link"):
        self.links.append(attrs[key])
        self.words.append(attrs[key])
    if tag in ("script", "style"):
      self._skip += 1

  def handle_endtag(self, tag):
    if tag in ("script", "style"):
      self._skip -= 1

  def handle_data(self, data):
    if not self._skip:
      self.words.append(data)


def _pages(out):
  return {p.relative_to(out).as_posix(): _Page(p.read_text())
          for p in sorted(out.rglob("*.html")) if p.name != "404.html"}


def test_every_internal_link_and_anchor_resolves(site):
  out, _ = site
  pages = _pages(out)
  broken = []
  for name, page in pages.items():
    for link in page.links:
      url = urllib.parse.urlsplit(link)
      if url.scheme or url.netloc or link.startswith(("mailto:", "data:")):
        continue
      if not url.path:
        target = name
      else:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), url.path))
        if url.path.endswith("/") or not posixpath.splitext(target)[1]:
          target = posixpath.join(target, "index.html")
        if not (out / target).is_file():
          broken.append(f"{name}: {link} (no {target})")
          continue
      if url.fragment and target.endswith(".html"):
        ids = pages[target].ids if target in pages else set()
        if url.fragment not in ids:
          broken.append(f"{name}: {link} (no #{url.fragment} in {target})")
  assert not broken, "\n".join(broken)


def _documented(out):
  """(object, its name, the rendered API page) for every `::: name` of the
  API pages."""
  found = []
  for md in sorted((REPO / "docs").rglob("*.md")):
    rel = md.relative_to(REPO / "docs").with_suffix("")
    if rel.parts[0] not in ("api",):
      continue
    page = (rel.parent if rel.name == "index" else rel) / "index.html"
    for name in re.findall(r"^::: *(\S+)", md.read_text(), re.M):
      found.append((pkgutil.resolve_name(name), name, out / page))
  assert len(found) >= 10, found
  return found


# Docstring section titles and fence languages: the renderer replaces them.
_SYNTAX = {"args", "returns", "raises", "example", "examples", "attributes",
           "references", "python"}


def test_api_renders_every_docstring_whole(site):
  out, _ = site
  pages = {}
  lost = []
  for obj, name, page_path in _documented(out):
    page = pages.setdefault(page_path, _Page(page_path.read_text()))
    assert not page.unknown, (page_path, page.unknown)
    # A link's target is rewritten for the site: its text is what must show.
    doc = re.sub(r"\]\([^)]*\)|\]\[[^\]]*\]", "]", inspect.getdoc(obj))
    # Every word of the docstring is on the page: text read as a tag, or
    # dropped by the Markdown, would be missing.
    words = set(re.findall(r"\w+", doc.lower())) - _SYNTAX
    missing = sorted(words - set(re.findall(r"\w+", page.text.lower())))
    if missing:
      lost.append(f"{name}: {missing}")
    # What a docstring writes between angle brackets is shown as written.
    for bracket in re.findall(r"<[^<>\s=][^<>]*>", doc):
      if html.escape(bracket, quote=False) not in page_path.read_text():
        lost.append(f"{name}: {bracket!r} not shown")
  assert not lost, "\n".join(lost)
  # The condition of the state's fields, as typeset: ⟨g_t, θ_{t-1} - θ_0⟩.
  state = next(p for o, _, p in _documented(out) if o is spd_optax.SPDState)
  assert re.search(r"c_t = -\\langle g_t, \\theta_\{t-1\} - \\theta_0",
                   pages[state].text)


def test_api_returns_are_one_row(site):
  out, _ = site
  tables = 0
  for page in sorted((out / "api").rglob("index.html")):
    text = page.read_text()
    for m in re.finditer(r'doc-section-title">Returns:</span>.*?<tbody>(.*?)</tbody>',
                         text, re.S):
      rows = m.group(1).count("<tr")
      assert rows == 1, (page.relative_to(out).as_posix(), rows, m.group(1)[:600])
      tables += 1
  assert tables >= 4


def test_home_page_installs_and_trains(site):
  out, _ = site
  home = (out / "index.html").read_text()
  page = _Page(home)
  assert {"why-spd", "install", "quick-start"} <= page.ids, sorted(page.ids)
  assert "pip install" in page.text
  code = [html.unescape(re.sub(r"<[^>]+>", "", block))
          for block in re.findall(r'<code class="language-python">(.*?)</code>', home, re.S)
          + re.findall(r'<div class="highlight"><pre><span></span><code>(.*?)</code>',
                       home, re.S)]
  loops = [c for c in code if re.search(r"^for .*:$", c, re.M)
           and "tx.update(" in c and "apply_updates" in c]
  assert loops, code
  # One optimizer per block: a reader pasting the quick start gets one `tx`.
  assert all(len(re.findall(r"^tx = ", c, re.M)) <= 1 for c in code), code
  repo = re.search(r"^repo_url: *(\S+)", (REPO / "mkdocs.yml").read_text(), re.M)
  assert repo and repo.group(1).rstrip("/") in page.text
  for example in ("vit", "llm", "llm_full"):
    assert f"examples/{example}/" in page.links, (example, page.links)


# Words that tell of how the project was worked on rather than of the
# project. Written in pieces, so that this file does not match itself.
_PROCESS = re.compile("|".join([
    r"\biss" + r"ues? ?#?\d+",                    # numbered tickets
    r"\bthe \w+ iss" + r"ue\b",                   # "the GPU ..."
    r"\b(?:gpu|device|this|that|a|the|each|earlier|next|one)[ -]sess" + r"ions?\b",
    r"\bdevice to" + r"ol\b",
    r"\bano" + r"ther engineer|\bengine" + r"ers\b",
    r"\bother ag" + r"ents\b|\bag" + r"ents?\b",
    r"\bGPU ti" + r"me\b",
    r"\ble" + r"nt\b",
    r"\.\./sha" + r"red\b",
    r"\bthe C" + r"EO\b",
]), re.I)


def test_repository_text_speaks_of_the_project():
  files = subprocess.run(
      ["git", "ls-files", "--", "*.py", "*.md", "*.sh", "*.toml", "*.yml", "*.txt"],
      cwd=REPO, capture_output=True, text=True)
  if files.returncode:
    pytest.skip("not a git checkout")
  hits = []
  for name in files.stdout.split():
    path = REPO / name
    if not path.is_file():
      continue
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      if m := _PROCESS.search(line):
        hits.append(f"{name}:{i}: {m.group(0)!r} in {line.strip()[:120]}")
  assert not hits, "\n".join(hits)


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
