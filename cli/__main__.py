"""`python -m cli` runs the loupe command."""
from cli.main import run

run()
