"""bnfast's build backend: setuptools' own, with Cython a build requirement only when needed.

pyproject.toml names this module (``build-backend = "bnfast_backend"``, ``backend-path =
["build_backend"]``), the wrapping of ``setuptools.build_meta`` that setuptools documents for
dynamic build requirements.  Every hook is setuptools'; the two that list requirements for a
wheel add ``Cython>=3.0`` when the kept translation ``bnfast/_core.c`` does not match its
sources (see ``bnfast_cython``), so that an edited ``.pyx`` is translated again while an
unchanged checkout builds without installing Cython.
"""
from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every other hook unchanged)

import bnfast_cython as _cython


def _cython_if_needed():
    return [_cython.REQUIREMENT] if _cython.needs_translation() else []


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _cython_if_needed()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _cython_if_needed()
