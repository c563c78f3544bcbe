"""The kept Cython translation of the bindings (bnfast/_core.c) and the build backend.

An unchanged checkout must build without Cython (the translation's second line records the
SHA-256 of its sources); a changed .pyx must make the build require Cython and translate.
"""
import importlib
import os
import re
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKEND_DIR = os.path.join(ROOT, "build_backend")
IN_CHECKOUT = os.path.isdir(BACKEND_DIR) and os.path.exists(os.path.join(ROOT, "setup.py"))
pytestmark = pytest.mark.skipif(not IN_CHECKOUT, reason="needs the source checkout")


@pytest.fixture
def cy(monkeypatch):
    monkeypatch.syspath_prepend(BACKEND_DIR)
    monkeypatch.delenv("BNFAST_CYTHONIZE", raising=False)
    mod = importlib.import_module("bnfast_cython")
    return importlib.reload(mod)


def _copy_inputs(cy, dest):
    for name in cy.INPUTS + (cy.OUTPUT, "bnfast/__init__.py"):
        os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), os.path.join(dest, name))
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(dest, "csrc"),
                    ignore=shutil.ignore_patterns("cuda"))


def test_kept_translation_records_the_current_sources(cy):
    got, want = cy.recorded(), cy.stamp()
    assert got == want, (
        f"{cy.OUTPUT} was not regenerated after an edit of {', '.join(cy.INPUTS)}: every "
        f"install would then need Cython.  Run BNFAST_CYTHONIZE=1 python setup.py build_ext "
        f"--inplace and commit {cy.OUTPUT}.\n recorded: {got!r}\n expected: {want!r}")
    assert not cy.needs_translation()


def test_inputs_list_every_bnfast_file_the_pyx_reads(cy):
    with open(os.path.join(ROOT, cy.PYX), encoding="utf-8") as f:
        src = f.read()
    assert not re.search(r"^\s*include\s+['\"]", src, re.M), "an include is not in INPUTS"
    for mod in re.findall(r"^\s*from\s+bnfast\s+cimport\s+(\w+)", src, re.M):
        assert f"bnfast/{mod}.pxd" in cy.INPUTS, mod
    assert not re.findall(r"^\s*cimport\s+bnfast", src, re.M)
    assert not re.findall(r"^\s*from\s+bnfast\.\w+\s+cimport", src, re.M)


def test_an_edit_a_missing_file_or_the_switch_asks_for_translation(cy, tmp_path,
                                                                    monkeypatch):
    _copy_inputs(cy, tmp_path)
    assert not cy.needs_translation(str(tmp_path))
    monkeypatch.setenv("BNFAST_CYTHONIZE", "1")
    assert cy.needs_translation(str(tmp_path))
    monkeypatch.setenv("BNFAST_CYTHONIZE", "0")
    assert not cy.needs_translation(str(tmp_path))
    for name in cy.INPUTS:                      # an edit of any input
        path = tmp_path / name
        orig = path.read_bytes()
        path.write_bytes(orig + b"\n# edited\n")
        assert cy.needs_translation(str(tmp_path)), name
        path.write_bytes(orig.replace(b"\n", b"\r\n"))   # line endings alone do not count
        assert not cy.needs_translation(str(tmp_path)), name
        path.write_bytes(orig)
    os.remove(tmp_path / cy.OUTPUT)
    assert cy.recorded(str(tmp_path)) is None and cy.needs_translation(str(tmp_path))


def test_backend_requires_cython_only_when_the_translation_is_stale(cy, monkeypatch,
                                                                   capfd):
    # setuptools older than pyproject.toml's build requirement cannot read its metadata
    pytest.importorskip("setuptools", minversion="77")
    monkeypatch.chdir(ROOT)                     # the hooks run in the source tree
    backend = importlib.reload(importlib.import_module("bnfast_backend"))
    for hook in (backend.get_requires_for_build_wheel,
                 backend.get_requires_for_build_editable):
        assert not any(r.lower().startswith("cython") for r in hook()), hook.__name__
    monkeypatch.setenv("BNFAST_CYTHONIZE", "1")
    for hook in (backend.get_requires_for_build_wheel,
                 backend.get_requires_for_build_editable):
        assert cy.REQUIREMENT in hook(), hook.__name__
    # sdists carry the kept translation: no Cython to make one
    assert not any(r.lower().startswith("cython")
                   for r in backend.get_requires_for_build_sdist())
    # every other PEP 517 hook is setuptools' own
    from setuptools import build_meta
    for name in ("build_wheel", "build_sdist", "build_editable",
                 "prepare_metadata_for_build_wheel", "prepare_metadata_for_build_editable"):
        assert getattr(backend, name) is getattr(build_meta, name), name
    capfd.readouterr()


def test_pyproject_names_the_backend():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    assert 'build-backend = "bnfast_backend"' in text
    assert 'backend-path = ["build_backend"]' in text
    req = re.search(r"^requires\s*=\s*\[(.*)\]", text, re.M).group(1)
    assert "setuptools" in req and "cython" not in req.lower()


def test_translation_is_what_cython_makes_of_the_sources(cy, tmp_path):
    """The kept file is Cython's output for the recorded sources, not an edited copy (run
    with the Cython version that made it; other versions write other C)."""
    Cython = pytest.importorskip("Cython")
    with open(os.path.join(ROOT, cy.OUTPUT), encoding="utf-8") as f:
        made_by = re.match(r"/\* Generated by Cython (\S+) \*/", f.readline())
    assert made_by, "the first line names the Cython version"
    if made_by.group(1) != Cython.__version__:
        pytest.skip(f"{cy.OUTPUT} was made by Cython {made_by.group(1)}, "
                    f"this is {Cython.__version__}")
    _copy_inputs(cy, tmp_path)
    cy.translate(root=str(tmp_path))
    with open(os.path.join(ROOT, cy.OUTPUT), "rb") as f:
        kept = f.read()
    assert (tmp_path / cy.OUTPUT).read_bytes() == kept
