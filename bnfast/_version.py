"""The version of bnfast, written once: pyproject.toml reads it from here
([tool.setuptools.dynamic]), ``bnfast.__version__`` and ``show_config`` import it, and the
installed metadata follows."""
__version__ = "0.1.0"
