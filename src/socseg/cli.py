"""The ``socseg`` command line: registers the sub-commands from :mod:`socseg.commands`."""

from __future__ import annotations

import os

import click

from socseg import __version__
from socseg.commands.data import data
from socseg.commands.evaluate import evaluate
from socseg.commands.finetune import finetune
from socseg.commands.microstructure import microstructure
from socseg.commands.options import CommandError
from socseg.commands.relog import relog
from socseg.commands.report import report
from socseg.commands.search import evaluate_best, prepare, register, search
from socseg.commands.segment import segment
from socseg.commands.stats import stats
from socseg.commands.suggest import suggest_slices
from socseg.commands.train import train

DEBUG_ENV = "SOCSEG_DEBUG"


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (KeyError, FileNotFoundError, PermissionError)) or not str(error):
        text = f"{type(error).__name__}: {text}"
    return text


class Commands(click.Group):
    """Turns every exception a command raises into a one-line error (the traceback with SOCSEG_DEBUG=1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the point: no traceback for users
            if os.environ.get(DEBUG_ENV):
                raise
            raise CommandError(f"{one_line(error)} (set {DEBUG_ENV}=1 for the traceback)") from error


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="socseg")
def main() -> None:
    """Segment PXCT volumes of SOC Ni/YSZ electrodes and measure their microstructure."""


for command in (data, train, finetune, microstructure, report, evaluate, segment, stats, relog, suggest_slices,
                prepare, search, evaluate_best, register):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    main()
