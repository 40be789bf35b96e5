"""Generate ``docs/methods.md`` from the registry, so the method reference never drifts from the code."""

from __future__ import annotations

import dataclasses
import inspect

import longattn.methods  # noqa: F401 -- registers the shipped methods
from longattn.method import registry

HEADER = """# Methods

Generated from the registry by `longattn docs` (`make docs`); a test fails when it is out of date.
Every method is a frozen dataclass: `longattn.methods.<Class>(...)`, or from a string with
`longattn.from_string("name:field=value,...")` (tuples are written `a/b/c`).
"""


def methods_markdown() -> str:
    """The Markdown reference of every registered method, in registration order."""
    parts = [HEADER]
    for name, cls in registry().items():
        method = cls()
        doc = inspect.cleandoc(cls.__doc__ or "").strip()
        parts.append(f"## `{name}` — `{cls.__name__}`\n")
        parts.append(f"Hook: `{method.hook}`. Default: `{method.describe()}`.\n")
        parts.append(doc + "\n")
        rows = ["| parameter | default |", "|---|---|"]
        for f in dataclasses.fields(cls):
            if not (f.init and f.repr):  # tensors and derived fields have no printable default
                continue
            rows.append(f"| `{f.name}` | `{getattr(method, f.name)!r}` |")
        if len(rows) > 2:
            parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)
