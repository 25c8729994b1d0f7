"""Every module of the package imports with the declared dependencies alone."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import ibot

MODULES = sorted(m.name for m in pkgutil.walk_packages(ibot.__path__, prefix="ibot."))


def test_the_package_has_its_modules() -> None:
    # walk_packages found the tree (an empty list would make the test below vacuous).
    assert {"ibot.cli", "ibot.train.loop", "ibot.eval.corruptions", "ibot.data.datasets"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_python_m_ibot_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "ibot", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "pretrain" in done.stdout
