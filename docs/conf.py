"""Sphinx configuration for bnfast's documentation.

Build (from the repository root, with bnfast installed: ``pip install ".[docs]"``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The API reference is generated from the numpydoc docstrings (autodoc + autosummary +
numpydoc); the tutorials in ``docs/tutorials/`` are executed by sphinx-gallery at every
build and their figures embedded.  The build imports the *installed* bnfast (its compiled
extension must exist), so this file does not put the source tree on ``sys.path``.
"""
import os
import sys
import warnings

try:
    import bnfast
except ImportError as exc:  # pragma: no cover - a configuration error, explained
    raise ImportError(
        f"the documentation build imports bnfast, which failed: {exc}\n"
        "Install it first (pip install \".[docs]\" from the repository root), or build it in "
        "place (python setup.py build_ext --inplace) and set PYTHONPATH to the checkout."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))

project = "bnfast"
author = "bnfast developers"
copyright = "2026, bnfast developers"
version = release = bnfast.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    # MathJax 3 bundled in the package and copied to _static/mathjax/: math renders
    # without a network connection (no CDN).  It sets mathjax_path itself.
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "sphinx_copybutton",
    "sphinx_design",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "tutorials",           # sphinx-gallery sources; the built pages are in auto_tutorials/
    # sphinx-gallery's timing tables load jQuery/DataTables from CDNs; left from older builds
    "sg_execution_times.rst",
    "auto_tutorials/sg_execution_times.rst",
    "figures/*.md",        # notes beside the figures, not pages
    "**/README.md",
    "Thumbs.db",
    ".DS_Store",
]
templates_path = ["_templates"]
suppress_warnings = []

# -- MyST (Markdown pages, including docs/user_guide/nn.md and paper.md) -----------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath", "attrs_inline"]
myst_heading_anchors = 3

# -- API reference -------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "inherited-members": False,
                           "show-inheritance": True}
autodoc_typehints = "none"        # types are in the numpydoc "Parameters" sections
autodoc_member_order = "bysource"
numpydoc_show_class_members = False   # the class template lists methods itself
numpydoc_class_members_toctree = False
numpydoc_use_plots = False
numpydoc_xref_param_type = False
# Parameters and returns are documented in numpydoc style; render "x : int, default 1".
numpydoc_attributes_as_param_list = True

# -- Tutorials (executed at build time) ----------------------------------------------------
# Short runs: the whole gallery executes in well under a minute on two cores.
os.environ.setdefault("BNFAST_DOCS_BUILD", "1")
sphinx_gallery_conf = {
    "examples_dirs": ["tutorials"],
    "gallery_dirs": ["auto_tutorials"],
    "filename_pattern": r"/plot_",       # every tutorial is executed
    "ignore_pattern": r"__init__\.py|/_",
    "within_subsection_order": "FileNameSortKey",
    "abort_on_example_error": True,      # a failing tutorial fails the build
    "plot_gallery": "True",
    "download_all_examples": False,
    "remove_config_comments": True,
    "doc_module": ("bnfast",),
    "backreferences_dir": os.path.join("api", "generated", "backreferences"),
    "reference_url": {"bnfast": None},
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "show_memory": False,
    "min_reported_time": 1,
    "capture_repr": ("_repr_html_", "__repr__"),
    # No sg_execution_times pages: their table loads scripts from CDNs (the docs must read
    # offline).  Each tutorial still shows its own running time.
    "write_computation_times": False,
}
# Matplotlib: no display; keep its font cache out of the way of a read-only home.
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", category=UserWarning,
                        message="Matplotlib is currently using agg")

# -- HTML ----------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"bnfast {release}"
html_static_path = ["_static"]
html_css_files = ["bnfast.css"]
html_show_sourcelink = False
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version", "theme-version"],
    "logo": {"text": "bnfast"},
}
html_sidebars = {"index": [], "install": [], "quickstart": [], "changelog": []}
html_context = {"default_mode": "auto"}


# -- Figures that appear once they exist ---------------------------------------------------
def _figure_or_note(relpath, caption, missing):
    """MyST text for a figure under docs/, or a note when the file is not there yet."""
    if os.path.exists(os.path.join(HERE, relpath)):
        return (f":::{{figure}} /{relpath}\n:width: 100%\n:alt: {caption}\n\n{caption}\n:::\n")
    return f":::{{note}}\n{missing}\n:::\n"


# Pages written alongside the code they document (docs/user_guide/paper.md comes with bnfast.paper).
# Until such a page exists, toctree entries marked "% optional" are dropped and links to it
# become plain text, so the build stays warning-free either way.
OPTIONAL_PAGES = {"user_guide/paper": "the notes on the paper reproduction (docs/user_guide/paper.md)"}


def _missing(page):
    page = page.lstrip("/")     # "/user_guide/paper" is docs/user_guide/paper
    return not any(os.path.exists(os.path.join(HERE, d, page + ext))
                   for d in ("", "user_guide") for ext in (".md", ".rst"))


def _substitute(app, docname, source):
    """Resolve ``% FIGURE: path | caption | note`` lines and optional pages."""
    out = []
    for line in source[0].split("\n"):
        if line.startswith("% FIGURE:"):
            relpath, caption, missing = (s.strip() for s in line[len("% FIGURE:"):].split("|"))
            out.append(_figure_or_note(relpath, caption, missing))
        elif line.rstrip().endswith("% optional"):
            page = line.split("%")[0].strip()
            if not _missing(page):
                out.append(line.split("%")[0].rstrip())
        else:
            out.append(line)
    text = "\n".join(out)
    for page, words in OPTIONAL_PAGES.items():
        if _missing(page):
            for role in ("{doc}", ":doc:"):
                text = text.replace(f"{role}`/{page}`", words)
    source[0] = text


def setup(app):
    app.connect("source-read", _substitute)
    return {"parallel_read_safe": True}


print(f"bnfast {bnfast.__version__} from {os.path.dirname(bnfast.__file__)} "
      f"(kernel variant {bnfast.get_isa()}, {bnfast.get_num_threads()} threads); "
      f"Python {sys.version.split()[0]}")
