"""Every docstring example runs and shows what it prints (doctest), module by module.

Examples may use ``torch``, ``nn``, ``F`` and ``asymprop`` without importing them; anything else
they need they build themselves, so no example shows an output it did not produce.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymprop

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(asymprop.__path__, prefix="asymprop.")
    if not info.name.endswith("__main__")  # importing it runs the CLI
)


@pytest.mark.parametrize("name", ["asymprop", *MODULES])
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    report: list[str] = []
    for test in finder.find(module, name, globs={}):
        test.globs.update(vars(module))
        test.globs.update(torch=torch, nn=nn, F=F, asymprop=asymprop)
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
