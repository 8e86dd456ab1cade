"""``python -m qexport`` (also what torchrun runs with ``-m qexport``)."""

from qexport.cli import main

main()
