"""Optional dependencies (``pip install 'ibot[EXTRA]'``), imported when a command needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from ibot.errors import IBOTError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise IBOTError(f"{purpose} needs {module.split('.')[0]}: pip install 'ibot[{extra}]'") from None
