"""The ``socseg`` command line: registers the sub-commands from :mod:`socseg.commands`."""

from __future__ import annotations

import click

from socseg import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="socseg")
def main() -> None:
    """Segment PXCT volumes of SOC Ni/YSZ electrodes and measure their microstructure."""


def _register() -> None:
    from socseg.commands.data import data
    from socseg.commands.evaluate import evaluate
    from socseg.commands.microstructure import microstructure
    from socseg.commands.search import evaluate_best, prepare, register, search
    from socseg.commands.segment import segment
    from socseg.commands.train import train

    main.add_command(data)
    main.add_command(train)
    main.add_command(microstructure)
    main.add_command(evaluate)
    main.add_command(segment)
    for command in (prepare, search, evaluate_best, register):
        main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
