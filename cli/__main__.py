"""`python -m segs.cli` runs the segs-stream command."""

from .main import main

main()
