"""``python -m khibernate``: the same as the ``khibernate`` command."""

from khibernate.cli import main

main()
