"""The package's import structure: no import cycle between bnfast's modules, the kernel
layer (``import bnfast``) does not load the framework on top of it (nn, optim, train),
which loads on first use, and the version is written once."""
import ast
import importlib.machinery
import os
import re
import subprocess
import sys
import tempfile

import pytest

import bnfast
from conftest import package_env

PACKAGE_DIR = os.path.dirname(os.path.abspath(bnfast.__file__))
ROOT = os.path.dirname(PACKAGE_DIR)

# Imports that form a cycle and are not this suite's to fix, each with the reason; an entry
# whose import is gone is ignored.  Empty is the goal.
KNOWN_CYCLE_EDGES = {}   # (importer, imported): reason; none today


# ------------------------------------------------------------------ the import graph

def package_modules(package_dir=PACKAGE_DIR, package="bnfast"):
    """``{module name: path}`` of every Python and Cython (``.pyx``) module of the
    package, subpackages too; a compiled extension without its .pyx (an installed wheel)
    is a module with no path, whose imports are not seen."""
    mods = {}
    compiled = {}
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.exists(os.path.join(dirpath, d, "__init__.py")))
        rel = os.path.relpath(dirpath, package_dir)
        parts = [package] + ([] if rel == "." else rel.split(os.sep))
        for fn in sorted(filenames):
            if fn.endswith((".py", ".pyx")):
                stem = fn.rsplit(".", 1)[0]
                name = ".".join(parts if stem == "__init__" else parts + [stem])
                mods[name] = os.path.join(dirpath, fn)
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                if fn.endswith(suffix):
                    compiled[".".join(parts + [fn[:-len(suffix)]])] = None
    return {**compiled, **mods}


def _is_package(name, mods):
    return (mods.get(name) or "").endswith("__init__.py")


def _resolve(name, mods, node):
    """The modules of `mods` that the import statement `node` in module `name` loads by
    name: the module itself, or for ``from X import a`` submodule ``X.a`` where there is
    one, and X otherwise.  Parent packages are not counted (a submodule's import always
    runs its package's __init__ first; that is not a dependency of the submodule)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in mods}
    if node.level:
        base = name.split(".") if _is_package(name, mods) else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = set()
    for a in node.names:
        sub = f"{target}.{a.name}"
        if sub in mods:
            out.add(sub)
        elif target in mods:
            out.add(target)
    return out


def import_graph(mods):
    """``{module: set of modules it imports}``, from every import statement anywhere in
    the module (in functions too: they are dependencies all the same)."""
    graph = {}
    for name, path in mods.items():
        if path is None:                # compiled, no source here
            graph[name] = set()
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".pyx"):       # Cython: its Python import lines (not cimports)
            text = "\n".join(line.strip() for line in text.splitlines()
                             if re.match(r"\s*(import|from\s+\S+\s+import)\s", line)
                             and "cimport" not in line and not line.rstrip().endswith("("))
        tree = ast.parse(text, path)
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _resolve(name, mods, node)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph):
    """One cycle of `graph` as a list ``[a, b, ..., a]``, or None."""
    state = {}                      # 1: on the current path, 2: done
    path = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        path.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    mods = package_modules()
    assert {"bnfast", "bnfast.nn", "bnfast.nn.module", "bnfast._api"} <= set(mods)
    graph = import_graph(mods)
    assert "bnfast.nn.module" in graph["bnfast.nn.utils"]          # the parser sees them
    assert "bnfast._api" in graph["bnfast.nn.batchnorm"]
    for a, b in KNOWN_CYCLE_EDGES:
        graph.get(a, set()).discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nn_is_layered():
    """utils depends on the layers, the layers on module; never the other way."""
    graph = import_graph(package_modules())
    nn = {k: {d for d in v if d.startswith("bnfast.nn.")}
          for k, v in graph.items() if k.startswith("bnfast.nn.")}
    assert nn["bnfast.nn.module"] == set()
    for layer in ("batchnorm", "layers", "loss", "residual"):
        assert "bnfast.nn.utils" not in nn[f"bnfast.nn.{layer}"]


def test_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "sub" / "b.py").write_text("from ..sub.c import h\n")
    (pkg / "sub" / "c.py").write_text("from . import a\n")
    (pkg / "top.py").write_text("import pkg.sub.a\nfrom pkg.sub import b, ext\n")
    (pkg / "sub" / "ext.pyx").write_text("cimport numpy\nfrom . import c\n")
    mods = package_modules(str(pkg), "pkg")
    graph = import_graph(mods)
    assert graph["pkg.top"] == {"pkg.sub.a", "pkg.sub.b", "pkg.sub.ext"}
    assert graph["pkg.sub.ext"] == {"pkg.sub.c"}
    assert graph["pkg.sub"] == {"pkg.sub.a"}
    assert find_cycle(graph) == ["pkg.sub.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.a"]
    (pkg / "sub" / "c.py").write_text("X = 1\n")
    assert find_cycle(import_graph(mods)) is None


# ------------------------------------------------------------------ lazy framework

def _run(code):
    r = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(),
                       env=package_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_bnfast_loads_the_kernel_layer_only():
    out = _run("import sys, bnfast\n"
               "print(' '.join(sorted(m for m in sys.modules if m.startswith('bnfast'))))")
    loaded = set(out.split())
    assert "bnfast._api" in loaded and "bnfast._core" in loaded
    for name in ("bnfast.nn", "bnfast.optim", "bnfast.train"):
        assert name not in loaded, f"import bnfast loaded {name}: {sorted(loaded)}"


def test_nn_and_optim_load_on_first_use():
    out = _run("import sys, bnfast\n"
               "assert 'nn' in dir(bnfast) and 'optim' in dir(bnfast)\n"
               "net = bnfast.nn.Linear(2, 3, rng=0)\n"
               "assert 'bnfast.nn' in sys.modules and 'bnfast.optim' not in sys.modules\n"
               "from bnfast import optim\n"
               "opt = optim.SGD(net.parameters(), lr=0.1)\n"
               "from bnfast import nn\n"
               "assert nn is bnfast.nn and optim is bnfast.optim\n"
               "print(type(net).__name__, type(opt).__name__)")
    assert out.split() == ["Linear", "SGD"]


def test_lazy_attributes_in_process():
    assert bnfast.nn.Module is bnfast.nn.module.Module
    assert bnfast.optim.SGD.__name__ == "SGD"
    assert {"nn", "optim", "batch_norm"} <= set(dir(bnfast))
    assert {"nn", "optim"} <= set(bnfast.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        bnfast.no_such_name


# ------------------------------------------------------------------ the version

def test_version_has_one_source():
    """pyproject.toml reads the version from bnfast/_version.py, where it is written once
    (no other module of the package assigns __version__)."""
    tomllib = pytest.importorskip("tomllib")
    path = os.path.join(ROOT, "pyproject.toml")
    if not os.path.exists(path):
        pytest.skip("not a source checkout")
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    assert "version" not in cfg["project"]
    assert "version" in cfg["project"]["dynamic"]
    assert (cfg["tool"]["setuptools"]["dynamic"]["version"]
            == {"attr": "bnfast._version.__version__"})
    written = {}
    for dirpath, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                values = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
                          and isinstance(n.value, ast.Constant)
                          and any(getattr(t, "id", None) == "__version__" for t in n.targets)]
                if values:
                    written[os.path.relpath(path, PACKAGE_DIR)] = values
    # a literal, which setuptools reads statically, in one file
    assert written == {"_version.py": [bnfast.__version__]}
