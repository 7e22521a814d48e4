"""The client side: async SDK (and sync wrapper), discovery, Worker."""

from simplequeue.client.client import Client, calls_within
from simplequeue.client.followups import Done
from simplequeue.client.job import Job
from simplequeue.client.sync import SyncClient
from simplequeue.client.tasks import Task, Tasks
from simplequeue.client.worker import Backoff, Worker

__all__ = [
    "Backoff",
    "Client",
    "Done",
    "Job",
    "SyncClient",
    "Task",
    "Tasks",
    "Worker",
    "calls_within",
]
