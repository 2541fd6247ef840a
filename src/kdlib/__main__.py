"""``python -m kdlib`` is the ``kdlib`` command."""

from kdlib.cli import main

main()
