"""`python -m simplequeue.broker` runs simplequeued."""

from simplequeue.broker.cli import main

main()
