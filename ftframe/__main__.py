"""Entry point of the ``ftframe`` console script and ``python -m ftframe``: the CLI, plus the commands of the layer
above it (``ftframe tune`` runs ``ftframe fit`` trials)."""

from ftframe import tune
from ftframe.cli import main as cli_main

#: the commands this layer adds to ftframe.cli's (each is listed in ``ftframe --help``: ftframe.cli.COMMANDS)
COMMANDS = {"tune": tune.main}


def main() -> None:
    cli_main(commands=COMMANDS)


if __name__ == "__main__":
    main()
