"""`python -m planner ...` runs the `pilot` command line."""

from planner.cli import main

main()
