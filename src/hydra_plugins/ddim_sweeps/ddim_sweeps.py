"""Hydra search-path plugin: ``+sweeps=<preset>`` finds the presets in ``<repo>/sweeps`` from any working directory.

The presets live beside ``conf/`` (the primary config folder of ``evaluate.py``), so the folder above the primary
config folder joins the search path whenever it holds a ``sweeps/`` folder; nothing else is touched.  Hydra finds
this plugin through the ``hydra_plugins`` namespace package, which ``pip install -e .`` installs with ``ddim``.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

SWEEPS_GROUP = "sweeps"


def _local_dir(path: str) -> Path | None:
    """A search-path entry as a local folder (``/abs`` or ``file:///abs``), None for ``pkg://`` and the like."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    elif "://" in path:
        return None
    return Path(path)


class DdimSweepsSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for element in list(search_path.get_path()):
            if element.provider != "main":
                continue
            conf = _local_dir(element.path)
            root = conf.resolve().parent if conf is not None else None
            if root is not None and (root / SWEEPS_GROUP).is_dir():
                search_path.append("ddim-sweeps", f"file://{root}")
