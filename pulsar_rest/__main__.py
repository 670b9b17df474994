"""`python -m pulsar_rest` and the `pulsar-rest` command."""

import sys


def run() -> int:
    """Start the command. Ctrl-C while its modules are still loading (a second or so) ends
    it quietly, as it does later."""
    try:
        from pulsar_rest.cli import main
    except KeyboardInterrupt:
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
