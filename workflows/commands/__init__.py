"""Subcommands of the ciae CLI, one module each, and ``defaults``: where their options' defaults
come from (the signatures of the functions and jobs they call)."""

from __future__ import annotations

import dataclasses
import inspect


def defaults(obj) -> dict:
    """Parameter defaults of a function, or field defaults of a dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: f.default for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING}
    return {k: p.default for k, p in inspect.signature(obj).parameters.items()
            if p.default is not inspect.Parameter.empty}
