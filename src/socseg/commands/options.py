"""What the commands share: options made from the parameter schema (a setting is declared once, in
socseg.params), the params they read, and the one-line error."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Iterable, Mapping

import click

from socseg.params import Params, load_params, override


class CommandError(click.ClickException):
    """Any failure of a command, shown as one line ``error: <what>``; exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class Blankable(click.ParamType):
    """Wrap a type so that an empty string means "not given" (MLproject passes '' for unset params)."""

    def __init__(self, inner: click.ParamType | type):
        self.inner = click.types.convert_type(inner)
        self.name = self.inner.name

    def get_metavar(self, param, ctx=None):
        return self.inner.get_metavar(param, ctx)

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        return self.inner.convert(value, param, ctx)


def blankable(inner: click.ParamType | type) -> Blankable:
    return Blankable(inner)


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = typing.get_type_hints(Params)[section]
    return {f.name: f for f in dataclasses.fields(cls)}


def param_option(section: str, name: str, flag: str | None = None, dest: str | None = None,
                 help: str | None = None, choices: Iterable[str] | None = None):
    """``--<name>`` (or ``flag``, into argument ``dest``) overriding ``<section>.<name>`` of
    params.yaml; its type, choices and help come from the schema (``choices`` replaces them).
    Unset: None, so params.yaml decides."""
    field = _section_fields(section)[name]
    kind = typing.get_type_hints(typing.get_type_hints(Params)[section])[name]
    known = tuple(choices) if choices is not None else field.metadata.get("choices")
    if known and not field.metadata.get("or_path"):
        param_type: Any = click.Choice(list(known))
    else:
        param_type = {bool: click.BOOL, int: int, float: float}.get(kind, str)
    text = help or field.metadata.get("help", "")
    flag = flag or "--" + name.replace("_", "-")
    return click.option(flag, dest or name, type=blankable(param_type),
                        help=f"{text} [params: {section}.{name}]")


def section_options(section: str, names: Iterable[str]) -> Callable[[Callable], Callable]:
    """One :func:`param_option` per name, in order."""

    def decorate(command: Callable) -> Callable:
        for name in reversed(list(names)):
            command = param_option(section, name)(command)
        return command

    return decorate


params_file_option = click.option(
    "--params", "params_file", type=click.Path(dir_okay=False, exists=True), help="params.yaml to read."
)


def load_with(params_file: str | None, **sections: Mapping[str, Any]) -> dict:
    """params.yaml (or ``params_file``) with the given command-line values over it (None: not given)."""
    params = load_params(params_file)
    for section, values in sections.items():
        params = override(params, section, **values)
    return params
