"""Checks of the built HTML documentation (skipped unless it has been built).

Build it first (``pip install ".[docs]"`` and ``sphinx-build -W --keep-going -b html docs
docs/_build/html``); ``BNFAST_DOCS_HTML`` names another output folder.

- The pages read offline: no page loads a script, style sheet or font from another site
  (math is rendered by the MathJax copy bundled under ``_static/mathjax/``).
- Every public function's and class's API page lists each parameter of its signature in
  its Parameters section, and its Returns section when the docstring has one.
"""
import glob
import html
import importlib
import inspect
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HTML = os.environ.get("BNFAST_DOCS_HTML") or os.path.join(ROOT, "docs", "_build", "html")

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(HTML, "index.html")),
    reason=f"the documentation is not built at {HTML} (set BNFAST_DOCS_HTML)")

MATH_CDNS = ("cdn.jsdelivr.net", "cdnjs.cloudflare.com", "unpkg.com", "mathjax.org",
             "polyfill.io", "katex.org", "fonts.googleapis.com")
MATHJAX = "_static/mathjax/tex-chtml.js"
# <script src=...>, <link href=...> and CSS url(...) that point to another site.
EXTERNAL = re.compile(r"""<script[^>]+src=["'](https?:)?//|<link[^>]+href=["'](https?:)?//"""
                      r"""|url\(\s*["']?(https?:)?//""", re.I)


def _pages():
    return sorted(glob.glob(os.path.join(HTML, "**", "*.html"), recursive=True))


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_no_page_loads_math_or_anything_else_from_another_site():
    pages = _pages()
    assert len(pages) > 20, pages
    bad = {}
    for page in pages:
        text = _read(page)
        found = [c for c in MATH_CDNS if c in text]
        found += [m.group(0) for m in EXTERNAL.finditer(text)]
        if found:
            bad[os.path.relpath(page, HTML)] = found
    assert not bad, f"pages that need the network: {bad}"


def test_math_uses_the_bundled_mathjax():
    asset = os.path.join(HTML, *MATHJAX.split("/"))
    assert os.path.isfile(asset) and os.path.getsize(asset) > 100_000, asset
    fonts = glob.glob(os.path.join(HTML, "_static", "mathjax", "output", "chtml", "fonts",
                                   "woff-v2", "*.woff"))
    assert fonts, "MathJax's fonts are not bundled"
    with_math = [p for p in _pages() if 'class="math' in _read(p)]
    assert with_math, "no page has math: the check would prove nothing"
    for page in with_math:
        text = _read(page)
        rel = os.path.relpath(asset, os.path.dirname(page)).replace(os.sep, "/")
        assert f'src="{rel}' in text, (page, rel)


# ---------------------------------------------------------------- API pages

def _api_pages():
    pages = glob.glob(os.path.join(HTML, "api", "generated", "bnfast*.html"))
    return sorted(os.path.basename(p)[:-len(".html")] for p in pages)


def _resolve(fullname):
    parts = fullname.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(fullname)


def _field(text, name):
    """Text of the field-list entry ``name`` (Parameters, Returns, ...) of the first object
    described on the page, or None."""
    m = re.search(r'<dt class="field-(?:odd|even)">' + name + r'<span class="colon">', text)
    if not m:
        return None
    start = text.index("<dd", m.end())
    nxt = re.compile(r'<dt class="field-(?:odd|even)">|</dl>\s*</dd>\s*</dl>')
    end = nxt.search(text, start)
    return text[start:end.start() if end else len(text)]


def _documented_names(field):
    names = set()
    for raw in re.findall(r"<dt><strong>(.*?)</strong>", field, re.S):
        for name in re.sub(r"<[^>]+>", "", html.unescape(raw)).split(","):
            names.add(name.strip().lstrip("*"))
    return names


def _parameters(obj):
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.name not in ("self", "cls")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_api_pages_exist():
    names = _api_pages()
    for name in ("bnfast.batch_norm", "bnfast.batch_norm_train", "bnfast.batch_norm_infer",
                 "bnfast.batch_norm_backward", "bnfast.moments"):
        assert name in names, names


@pytest.mark.parametrize("fullname", _api_pages() or ["(none)"])
def test_api_page_documents_every_parameter(fullname):
    if fullname == "(none)":
        pytest.skip("no API pages")
    obj = _resolve(fullname)
    if not (inspect.isfunction(obj) or inspect.isclass(obj) or callable(obj)):
        pytest.skip(f"{fullname} is not callable")
    text = _read(os.path.join(HTML, "api", "generated", fullname + ".html"))
    params = _parameters(obj)
    field = _field(text, "Parameters")
    if params:
        assert field is not None, f"{fullname}: no Parameters section for {params}"
        documented = _documented_names(field)
        missing = [p for p in params if p not in documented]
        assert not missing, f"{fullname}: parameters not on the page: {missing}"
    doc = inspect.getdoc(obj) or ""
    if re.search(r"^Returns\n-------$", doc, re.M) and not inspect.isclass(obj):
        returns = _field(text, "Returns")
        assert returns is not None and re.search(r"<dt>|<dd", returns), \
            f"{fullname}: the Returns section does not render"
