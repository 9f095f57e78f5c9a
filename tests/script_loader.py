"""Load a script of ``benchmarks/`` as a module, so a test calls its ``main`` and its functions."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(relpath: str, module_name: str):
    """``ROOT/relpath`` executed as module ``module_name`` (registered in ``sys.modules``: its
    dataclasses and pickles resolve)."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
