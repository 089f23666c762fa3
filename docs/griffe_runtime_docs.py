"""Griffe extension: document each public loss with the docstring it has at import time.

infcl writes the shared spec once and attaches it to every loss when the module is imported
(`infcl._spec.describe`). Static analysis sees only the one-line summary in the source, and
inspection unwraps the decorators down to that same summary, so this reads the final `__doc__`.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[1]


class RuntimeDocstrings(griffe.Extension):
    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        if not func.path.startswith("infcl.") or func.name.startswith("_"):
            return
        obj = griffe.dynamic_import(func.path, import_paths=[ROOT, *sys.path])
        doc = getattr(obj, "__doc__", None)
        if not doc:
            return
        if func.docstring is None:
            func.docstring = griffe.Docstring(inspect.cleandoc(doc), parent=func)
        else:  # keep the parser and options the handler gave it
            func.docstring.value = inspect.cleandoc(doc)
