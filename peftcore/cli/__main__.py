"""``python -m peftcore.cli`` runs the ``peftcore`` command."""

from peftcore.cli import main

if __name__ == "__main__":  # not in the workers of --nproc-per-node, which re-import this module
    main(prog_name="peftcore")
