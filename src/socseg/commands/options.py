"""Shared click option types."""

from __future__ import annotations

import click


class Blankable(click.ParamType):
    """Wrap a type so that an empty string means "not given" (MLproject passes '' for unset params)."""

    def __init__(self, inner: click.ParamType | type):
        self.inner = click.types.convert_type(inner)
        self.name = self.inner.name

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        return self.inner.convert(value, param, ctx)


def blankable(inner: click.ParamType | type) -> Blankable:
    return Blankable(inner)
