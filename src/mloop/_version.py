"""mloop's version, in a module of its own: the layers that stamp it (run tags, exported files)
import it from here, never from the package's public façade (``mloop/__init__.py``), which
imports those layers. Keep it equal to ``version`` in pyproject.toml."""

__version__ = "0.1.0"
