"""`python -m dreambooth_fast ...` is `dbfast ...` (the benchmarks run the CLI this way, with this interpreter)."""

from .cli import main

main(prog_name="dbfast")
