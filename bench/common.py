"""What the benchmark scripts share."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def callbacks_package() -> None:
    """Make ``transmla_surgery.callbacks`` importable from a plain checkout (the package maps it from
    ``callbacks/``; an editable or regular install already does)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import transmla_surgery.callbacks  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "transmla_surgery.callbacks", ROOT / "callbacks" / "__init__.py",
            submodule_search_locations=[str(ROOT / "callbacks")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["transmla_surgery.callbacks"] = module
        spec.loader.exec_module(module)
