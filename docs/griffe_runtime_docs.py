"""Griffe extension: document each public loss with the docstring it has at import time.

infcl writes the shared spec once and attaches it to every loss when the module is imported
(`infcl._spec.describe`). Static analysis sees only the one-line summary in the source, and
inspection unwraps the decorators down to that same summary, so this reads the final `__doc__`.
On the site the spec's prose is written once (the API page's contract sections, through
`docs/hooks.py`); each loss's entry points there and keeps its arguments.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[1]
POINTER = {
    "SPEC_PROSE": "\n    Computes the loss of [the contract][the-contract] of every softmax loss.\n",
    "SIGMOID_SPEC_PROSE": "\n    Computes the loss of [the sigmoid contract][the-sigmoid-contract].\n",
}


class RuntimeDocstrings(griffe.Extension):
    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        if not func.path.startswith("infcl.") or func.name.startswith("_"):
            return
        obj = griffe.dynamic_import(func.path, import_paths=[ROOT, *sys.path])
        doc = getattr(obj, "__doc__", None)
        if not doc:
            return
        spec = griffe.dynamic_import("infcl._spec", import_paths=[ROOT, *sys.path])
        for name, pointer in POINTER.items():
            doc = doc.replace(getattr(spec, name), pointer)
        if func.docstring is None:
            func.docstring = griffe.Docstring(inspect.cleandoc(doc), parent=func)
        else:  # keep the parser and options the handler gave it
            func.docstring.value = inspect.cleandoc(doc)
