"""`python -m pacscli` runs the command line."""

from pacscli.cli.app import main

main()
