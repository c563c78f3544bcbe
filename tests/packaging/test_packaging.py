"""Packaging and documentation checks.

- the package imported is the one meant (the wheel check runs this suite against an
  installed wheel and says where it must come from);
- every module of the package imports, and the examples in its docstrings run (doctest);
- every public function and class has a complete numpydoc docstring (parameters, returns,
  raises, an example; every parameter and return value with a description), and appears
  in the API reference of the documentation;
- the release build flags are portable (no -march=native, no fast-math), the compiled
  extension has AVX code only in the run-time-dispatched variants, and MANIFEST.in ships
  the build inputs and no build outputs.

The full wheel check (build, sdist listing, auditwheel, clean venv) is tools/check_wheel.sh.
"""
import ast
import doctest
import importlib
import inspect
import os
import pkgutil
import platform
import re
import shutil
import subprocess
import sys

import pytest

import bnfast

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(TESTS))      # the source checkout holding tests/
IN_CHECKOUT = os.path.exists(os.path.join(ROOT, "setup.py"))


# ------------------------------------------------------------------ which bnfast

def test_bnfast_is_imported_from_the_expected_place():
    where = os.environ.get("BNFAST_EXPECT_INSTALLED_IN")
    if not where:
        pytest.skip("set by tools/check_wheel.sh when testing an installed wheel")
    path = os.path.realpath(bnfast.__file__)
    assert path.startswith(os.path.realpath(where) + os.sep), (
        f"bnfast was imported from {path}, not from {where}")
    assert not path.startswith(os.path.realpath(ROOT) + os.sep)
    print(f"bnfast.__file__ = {bnfast.__file__}")


# ------------------------------------------------------------------ modules and examples

def _modules():
    names = ["bnfast"]
    for info in pkgutil.walk_packages(bnfast.__path__, "bnfast."):
        if not info.name.rsplit(".", 1)[-1] == "__main__":
            names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_module_imports_and_its_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # examples that write files write them here
    mod = importlib.import_module(name)
    state = (bnfast.get_isa(), bnfast.get_num_threads())
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    for test in finder.find(mod, name):          # globals: a copy of the module's
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) in {name} failed"
    assert (bnfast.get_isa(), bnfast.get_num_threads()) == state, "an example leaked state"


# ------------------------------------------------------------------ docstrings

PUBLIC_MODULES = ["bnfast", "bnfast.reference", "bnfast.nn", "bnfast.optim", "bnfast.train",
                  "bnfast.paper.mnist_fig1", "bnfast.paper.accelerate", "bnfast.paper.common",
                  "bnfast.paper.cli",
                  "bnfast.datasets", "bnfast.distributed"]

SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]+)\n\s*-{3,}\s*$", re.M)

# Public objects whose docstrings still lack a section required below (the value says
# which).  This list may only shrink: the test fails when an object not listed here is
# incomplete, and when a listed object has been completed (remove it from the list).
KNOWN_INCOMPLETE = {
}


def _public_objects():
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{modname}.{name}", obj


def _sections(doc):
    """Return {section title: body text} of a numpydoc docstring."""
    doc = inspect.cleandoc(doc or "")
    marks = list(SECTION.finditer(doc))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(doc)
        out[m.group(1).strip()] = doc[m.end():end]
    return out


def _documented_params(body):
    names = set()
    for line in body.splitlines():
        if line and not line[0].isspace():
            head = line.split(" : ")[0] if " : " in line else line
            for part in head.split(","):
                part = part.strip().lstrip("*")
                if part:
                    names.add(part)
    return names


def _own_body_nodes(func):
    """AST nodes of `func`'s body, not descending into nested functions or classes."""
    try:
        src = inspect.getsource(func)
    except (OSError, TypeError):
        return []
    tree = ast.parse(inspect.cleandoc("\n" + src) if src[0].isspace() else src)
    fn = tree.body[0]
    nodes, todo = [], list(fn.body)
    while todo:
        n = todo.pop()
        nodes.append(n)
        for child in ast.iter_child_nodes(n):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                      ast.Lambda)):
                todo.append(child)
    return nodes


def _missing_sections(obj):
    """The numpydoc sections `obj`'s docstring lacks.

    Parameters: every argument (of ``__init__`` for a class) documented.  Returns (or
    Yields): a function whose own body returns a value (or yields), except context
    managers.  Raises: a body (``__init__`` for a class) with a ``raise`` statement.
    Examples: always, except for exception classes, which need only a docstring.
    """
    doc = inspect.getdoc(obj) if not inspect.isclass(obj) else obj.__doc__
    if not doc:
        return ["docstring"]
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return []
    sec = _sections(doc)
    missing = []
    func = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and func is object.__init__:
        func = None
    params = []
    if func is not None:
        try:
            sig = inspect.signature(func)
            params = [p.name for p in sig.parameters.values() if p.name not in ("self", "cls")]
        except (TypeError, ValueError):
            pass
    if params:
        body = sec.get("Parameters", "")
        if not body:
            missing.append("Parameters")
        else:
            undocumented = [p for p in params if p not in _documented_params(body)]
            if undocumented:
                missing.append("Parameters: " + ", ".join(undocumented))
    nodes = _own_body_nodes(func) if func is not None else []
    context_manager = hasattr(obj, "__wrapped__") and inspect.isgeneratorfunction(
        obj.__wrapped__)
    if not inspect.isclass(obj) and not context_manager:
        returns = any(isinstance(n, ast.Return) and n.value is not None
                      and not (isinstance(n.value, ast.Constant) and n.value.value is None)
                      for n in nodes)
        yields = any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in nodes)
        if returns and not yields and "Returns" not in sec:
            missing.append("Returns")
        if yields and not ("Yields" in sec or "Returns" in sec):
            missing.append("Yields")
    if any(isinstance(n, ast.Raise) and n.exc is not None for n in nodes) \
            and "Raises" not in sec:
        missing.append("Raises")
    if "Examples" not in sec:
        missing.append("Examples")
    return missing


def test_public_docstrings_are_complete():
    incomplete = {}
    for qualname, obj in _public_objects():
        missing = _missing_sections(obj)
        if missing:
            incomplete[qualname] = ", ".join(missing)
    new = {k: v for k, v in incomplete.items() if k not in KNOWN_INCOMPLETE}
    fixed = sorted(k for k in KNOWN_INCOMPLETE if k not in incomplete)
    msg = []
    if new:
        msg.append("public objects with incomplete numpydoc docstrings:\n" + "\n".join(
            f"  {k}: missing {v}" for k, v in sorted(new.items())))
    if fixed:
        msg.append("complete now, remove from KNOWN_INCOMPLETE in tests/packaging/test_packaging.py: "
                   + ", ".join(fixed))
    assert not msg, "\n".join(msg)


# Sections whose entries (``name : type`` lines, or a bare type in Returns) each need a
# description: the indented text under the entry, which the API pages render.
DESCRIBED_SECTIONS = ("Parameters", "Other Parameters", "Returns", "Yields", "Receives")


def _public_docstrings():
    """(qualified name, docstring) of every public object and of its classes' public
    methods (the docstrings the API pages render)."""
    for qualname, obj in _public_objects():
        yield qualname, obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
        if not inspect.isclass(obj):
            continue
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if inspect.isfunction(member) and member.__doc__:
                yield f"{qualname}.{name}", member.__doc__


def _undescribed_entries(body):
    """The entry lines of a numpydoc section body with no indented description under
    them (as numpydoc parses a section: an unindented line starts an entry)."""
    lines = body.splitlines()
    empty = []
    for i, line in enumerate(lines):
        if not line.strip() or line[0].isspace():
            continue
        described = False
        for nxt in lines[i + 1:]:
            if not nxt.strip():
                continue
            described = nxt[0].isspace()
            break
        if not described:
            empty.append(line.strip())
    return empty


def test_undescribed_entries_parser():
    body = "x : int\n    The x.\ny, z : float\n\nw\n    A w.\nv : str\n"
    assert _undescribed_entries(body) == ["y, z : float", "v : str"]


def test_public_parameters_and_returns_are_described():
    """Every Parameters / Returns / Yields entry of a public object has a description
    (a name and a type alone render as a bare line on the API page)."""
    bare = []
    for qualname, doc in _public_docstrings():
        for title, body in _sections(doc).items():
            if title in DESCRIBED_SECTIONS:
                bare += [f"  {qualname} [{title}] {e}" for e in _undescribed_entries(body)]
    assert not bare, ("numpydoc entries without a description (add an indented line of "
                      "text under each):\n" + "\n".join(bare))


def test_api_reference_lists_every_public_name():
    api = os.path.join(ROOT, "docs", "api")
    if not os.path.isdir(api):
        pytest.skip("no docs/api beside the tests")
    text = ""
    for fn in sorted(os.listdir(api)):
        if fn.endswith(".rst"):
            with open(os.path.join(api, fn), encoding="utf-8") as f:
                text += f.read()
    listed = set(re.findall(r"^\s{3}([A-Za-z_][A-Za-z0-9_]*)\s*$", text, re.M))
    listed |= set(re.findall(r"^\.\. auto(?:data|function|class):: ([A-Za-z_][A-Za-z0-9_]*)",
                             text, re.M))
    missing = []
    for qualname, _ in _public_objects():
        if qualname.rsplit(".", 1)[1] not in listed:
            missing.append(qualname)
    assert not missing, f"not in the API reference (docs/api/*.rst): {missing}"


# ------------------------------------------------------------------ code in the docs

DOC_PAGES = ["index.md", "quickstart.md", "user_guide/semantics.md", "user_guide/momentum.md",
             "user_guide/layouts.md", "user_guide/threads.md"]

# Names the pages' snippets use without defining them (a page reads as a continuation of
# the quick start).  C = 4 channels on axis 1 and on axis -1, for the channels-last snippets.
DOC_PREAMBLE = """
import numpy as np
import bnfast
from bnfast import nn
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 4, 5, 4), dtype=np.float32)
dy = rng.standard_normal(x.shape, dtype=np.float32)
gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
running_mean, running_var = np.zeros(4, np.float32), np.ones(4, np.float32)
moving_mean, moving_variance = np.zeros(4, np.float32), np.ones(4, np.float32)
eps = 1e-5
X = rng.standard_normal((240, 10), dtype=np.float32)
model = nn.Sequential(nn.Linear(10, 8, rng=rng), nn.BatchNorm1d(8), nn.ReLU())
"""


def _python_blocks(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


@pytest.mark.parametrize("page", DOC_PAGES)
def test_documentation_code_runs(page, tmp_path, monkeypatch):
    path = os.path.join(ROOT, "docs", page)
    if not os.path.exists(path):
        pytest.skip(f"docs/{page} is not beside the tests")
    blocks = _python_blocks(path)
    assert blocks, f"docs/{page} has no python code blocks"
    monkeypatch.chdir(tmp_path)
    state = (bnfast.get_isa(), bnfast.get_num_threads())
    namespace = {"__name__": "__docs__"}
    exec(compile(DOC_PREAMBLE, "<preamble>", "exec"), namespace)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/{page}, python block {i + 1}", "exec"), namespace)
    finally:
        bnfast.set_num_threads(None)
    assert (bnfast.get_isa(), bnfast.get_num_threads()) == state


# ------------------------------------------------------------------ build and sdist

# Flags that tie the build to the building CPU or break IEEE semantics (NaN/Inf handling,
# reproducibility, bit-identical variants).
UNSAFE_FLAG = re.compile(
    r"-(march=|mtune=native|mavx|mfma|msse4|Ofast|f(fast|unsafe|finite)-math)|/(arch:|fp:fast)")


def _setup_py_strings():
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)]


@pytest.mark.skipif(not IN_CHECKOUT, reason="needs the source checkout (setup.py)")
def test_release_build_flags_are_portable():
    flags = [s for s in _setup_py_strings() if s.startswith(("-", "/")) and " " not in s]
    assert "-O3" in flags and "-ffp-contract=off" in flags, flags
    bad = [f for f in flags if UNSAFE_FLAG.match(f)]
    assert not bad, f"setup.py passes non-portable or unsafe flags: {bad}"
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        bad = [w for w in f.read().split() if UNSAFE_FLAG.match(w.strip("\"',[]"))]
    assert not bad, f"pyproject.toml passes non-portable or unsafe flags: {bad}"


def test_extension_has_avx_code_only_in_dispatched_variants():
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
        pytest.skip("the disassembly check is for x86-64 Linux builds")
    if shutil.which("objdump") is None or shutil.which("nm") is None:
        pytest.skip("objdump/nm (binutils) not installed")
    checker = os.path.join(ROOT, "tools", "check_isa.py")
    if not os.path.exists(checker):
        pytest.skip("tools/check_isa.py not beside the tests")
    ext = bnfast._core.__file__
    symbols = subprocess.run(["nm", ext], capture_output=True, text=True).stdout
    if "avx2" not in symbols:
        pytest.skip("the extension is stripped (tools/check_wheel.sh checks it before "
                    "stripping)")
    r = subprocess.run([sys.executable, checker, ext], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(not IN_CHECKOUT, reason="needs the source checkout (MANIFEST.in)")
def test_manifest_ships_build_inputs_and_no_build_outputs():
    with open(os.path.join(ROOT, "MANIFEST.in"), encoding="utf-8") as f:
        lines = [ln.split("#")[0].split() for ln in f]
    rules = [ln for ln in lines if ln]
    def has(cmd, *words):
        return any(r[0] == cmd and all(w in r[1:] for w in words) for r in rules)
    assert has("recursive-include", "csrc", "*.c", "*.h")
    assert has("include", "bnfast/_core.pyx")
    assert has("include", "bnfast/_core.c")          # the kept translation (no Cython needed)
    assert has("include", "build_backend/*.py")       # pyproject.toml's backend-path
    assert has("graft", "tests")
    assert has("prune", "build") and has("prune", "dist")
    assert any(r[0] == "global-exclude" and "*.so" in r for r in rules)
    # every source the extension is built from is covered by those rules
    for fn in os.listdir(os.path.join(ROOT, "csrc")):
        if fn == "cuda":        # the CUDA kernels (compiled at run time by NVRTC)
            assert has("recursive-include", "csrc/cuda", "*.cu", "*.cuh")
            for g in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
                assert g.endswith((".cu", ".cuh")), f"csrc/cuda/{g} is not shipped"
            continue
        assert fn.endswith((".c", ".h")), f"csrc/{fn} is not shipped by MANIFEST.in"
