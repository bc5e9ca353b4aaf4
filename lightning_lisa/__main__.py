"""``python -m lightning_lisa``: the ``lightning-lisa`` command."""

from lightning_lisa.recipes import cli_main

if __name__ == "__main__":
    cli_main()
