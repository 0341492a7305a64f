"""``python -m mloop``: the same command line as the ``mloop`` script (used to start workers
with the interpreter that runs mloop, whatever the PATH says)."""

from mloop.cli.app import entry

if __name__ == "__main__":
    entry()
