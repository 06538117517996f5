"""Entry point of the ``ftframe`` console script and ``python -m ftframe``: the CLI, plus the commands of the layer
above it (``ftframe tune`` runs ``ftframe fit`` trials)."""

from ftframe import tune
from ftframe.cli import main as cli_main


def main() -> None:
    cli_main(commands={"tune": tune.main})


if __name__ == "__main__":
    main()
