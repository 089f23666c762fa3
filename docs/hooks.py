"""mkdocs hook: the API page's contract sections are the library's own spec text (written once
in `infcl._spec`), so the page and `help()` cannot drift apart."""

from __future__ import annotations

import inspect
from typing import Any

from infcl import _spec

PLACES = {"<!-- contract -->": _spec.SPEC_PROSE, "<!-- sigmoid-contract -->": _spec.SIGMOID_SPEC_PROSE}


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    for mark, text in PLACES.items():
        markdown = markdown.replace(mark, inspect.cleandoc(text))
    return markdown
