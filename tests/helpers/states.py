"""Building state-machine settings from one set of keyword arguments in tests."""

from __future__ import annotations

import dataclasses
from typing import Any

from simplequeue.state import Bounds, Policy


def configured(**limits: Any) -> tuple[Bounds, Policy]:
    """Bounds and Policy from keyword arguments naming fields of either."""
    bound_fields = {f.name for f in dataclasses.fields(Bounds)}
    bounds = Bounds(**{k: v for k, v in limits.items() if k in bound_fields})
    policy = Policy(**{k: v for k, v in limits.items() if k not in bound_fields})
    return bounds, policy
