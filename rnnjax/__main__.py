"""``python -m rnnjax``: the command line."""

from rnnjax.cli import run

if __name__ == "__main__":
    run()
