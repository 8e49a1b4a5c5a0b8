"""`python -m loupe` runs the loupe command."""
from loupe.cli.main import run

run()
