"""Job: a job as the broker describes it (SPEC section 3), the API's own type."""

from simplequeue.api import Job

__all__ = ["Job"]
