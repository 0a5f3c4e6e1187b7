"""``python -m kensho`` runs the ``kensho`` command."""

from kensho.cli import main

main()
