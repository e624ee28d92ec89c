"""The papers' reproduction items (``asymprop reproduce``), one module per paper, built on the
harness: :mod:`.akrout` (001), :mod:`.liao` (002), :mod:`.lansdell` (004), :mod:`.convergence`
(KP's and WM's theory, 003 and 000) and :mod:`.study` (modern architectures, beyond the seeds);
:mod:`.common` holds what they share and :mod:`.verdicts` judges a claim against its criterion.

Each paper's module declares ``ITEMS`` (item name -> function ``(name, config, out) ->
ItemResult``; the config is the packaged ``configs/<name>.yaml``); :func:`collect_items` gathers
them for :mod:`asymprop.harness.reproduce`, in the order of :data:`PAPERS`, then any other module
of this package that declares items, by name.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAPERS = ("akrout", "liao", "lansdell", "crafton", "convergence", "study")
"""The order of the report's items: the papers' modules first, as in docs/REPRODUCTION.md."""


def collect_items() -> dict[str, Callable[[str, dict[str, Any], Path], Any]]:
    """Every item of every module of this package that declares ``ITEMS``, in report order.

    A name declared by two modules is refused (one item, one function).
    """
    found = {info.name for info in pkgutil.iter_modules(__path__)}
    order = [m for m in PAPERS if m in found] + sorted(found - set(PAPERS))
    items: dict[str, Callable[[str, dict[str, Any], Path], Any]] = {}
    for module_name in order:
        module = importlib.import_module(f"{__name__}.{module_name}")
        for name, function in getattr(module, "ITEMS", {}).items():
            if name in items:
                raise ValueError(f"item {name!r} is declared twice (again in {module_name})")
            items[name] = function
    return items
