"""`python -m simplequeue.client` runs the simplequeue command line."""

from simplequeue.client.cli import main

main()
