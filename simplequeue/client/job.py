"""Job: a job as the broker describes it (SPEC section 3), typed for clients."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Job:
    """A job. `lease_token` is set while this client holds its claim."""

    id: str
    payload: Any = None
    status: str = "pending"
    priority: int = 0
    run_at: float = 0.0
    attempts: int = 0
    max_attempts: int = 0
    created_at: float = 0.0
    claimed_by: str | None = None
    claimed_at: float | None = None
    heartbeat_at: float | None = None
    lease_expires_at: float | None = None
    lease_token: str | None = None
    last_error: str | None = None
    result: Any = None
    finished_at: float | None = None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Job:
        """Build from the broker's JSON, ignoring fields this client does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
