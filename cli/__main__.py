"""`python -m cli` runs the segs-stream command."""

from cli.main import main

main()
