"""simplequeue: a durable job queue whose only infrastructure is object storage."""

__version__ = "0.1.0"
