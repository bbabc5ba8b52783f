"""``python -m peftcore.cli`` runs the ``peftcore`` command."""

from peftcore.cli import main

main(prog_name="peftcore")
