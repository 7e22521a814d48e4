"""The command line's control commands (SPEC 7): cancel, schedule, schedules,
unschedule and settings, run as subprocesses against a live broker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from simplequeue.objstore.memfs import MemStore
from tests.test_cli import Cli, failed_with

StartBroker = Callable[..., Awaitable[Any]]


@pytest.fixture
async def cli(start_broker: StartBroker) -> Cli:
    broker = await start_broker(MemStore())
    return Cli("--broker", broker.url, "--topic", "jobs")


async def test_cancel_prints_what_it_cancelled_and_status_counts_it(cli: Cli) -> None:
    await cli.json("enqueue", "1", "--id", "a")
    await cli.json("enqueue", "2", "--id", "b", "--delay", "600")
    job = await cli.json("claim", "w")
    assert await cli.json("cancel", "a", "b", "c") == {
        "cancelled": ["a", "b"],
        "not_found": ["c"],
    }
    assert (await cli.json("job", "a"))["status"] == "cancelled"
    assert (await cli.json("status"))["cancelled"] == 2
    header = (await cli("status", "--table")).stdout.splitlines()[0].split()
    assert "cancelled" in header
    done = await cli("ack", "a", "--lease-token", job["lease_token"])
    assert failed_with(done, "JobCancelled: job 'a' was cancelled")
    assert (await cli("cancel")).returncode == 2  # a usage error: no JOB_ID


async def test_schedule_schedules_and_unschedule(cli: Cli) -> None:
    made = await cli.json("schedule", "tick", "--every", "60", '{"n": 1}')
    assert (made["name"], made["payload"], made["every"]) == ("tick", {"n": 1}, 60)
    assert made["next_at"] % 60 == 0
    nightly = await cli.json(
        "schedule", "nightly", "--cron", "30 2 * * *", "--tz", "Europe/Berlin", "backup"
    )
    assert (nightly["cron"], nightly["tz"], nightly["payload"]) == (
        "30 2 * * *",
        "Europe/Berlin",
        "backup",
    )
    listed = await cli("schedules", "--table")
    assert listed.returncode == 0
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["name", "when", "next"]
    assert lines[1].startswith("nightly") and "(Europe/Berlin)" in lines[1]
    assert lines[2].startswith("tick") and "every 60 s" in lines[2]
    assert [s["name"] for s in await cli.json("schedules")] == ["nightly", "tick"]
    assert [s["name"] for s in await cli.json("schedules", "--json")] == ["nightly", "tick"]
    assert await cli.json("unschedule", "tick") == {"deleted": "tick"}
    assert failed_with(await cli("unschedule", "tick"), "ScheduleNotFound")
    neither = await cli("schedule", "x", "1")
    assert neither.returncode == 2 and "give --every or --cron" in neither.stderr
    assert failed_with(await cli("schedule", "x", "--cron", "0 0 * * * *", "1"), "five fields")


async def test_settings_show_change_and_remove(cli: Cli) -> None:
    shown = await cli.json("settings")
    assert shown == {
        "rate": None,
        "burst": None,
        "max_claimed": None,
        "lease": None,
        "max_attempts": None,
    }
    changed = await cli.json("settings", "--rate", "2.5", "--max-claimed", "10", "--lease", "45")
    assert (changed["rate"], changed["burst"], changed["max_claimed"], changed["lease"]) == (
        2.5,
        3,
        10,
        45.0,
    )
    removed = await cli.json("settings", "--rate", "none", "--max-attempts", "3")
    assert (removed["rate"], removed["max_claimed"], removed["max_attempts"]) == (None, 10, 3)
    assert (await cli("settings", "--rate", "fast")).returncode == 2
    # "not a number" said of 1.5 (review finding): a count is a whole number.
    fractional = await cli("settings", "--max-claimed", "1.5")
    assert fractional.returncode == 2 and "'1.5' is not a whole number" in fractional.stderr
    assert failed_with(await cli("settings", "--max-claimed", "-1"), "InvalidRequest")


async def test_nan_and_inf_are_refused_and_change_nothing(cli: Cli) -> None:
    """JSON sends them as null: "--rate nan" removed the rate limit, and
    "claim --lease inf" took the broker's default lease; both exited 0."""
    await cli.json("settings", "--rate", "5", "--lease", "120")
    await cli.json("enqueue", '"x"')
    for args in (
        ("settings", "--rate", "nan"),
        ("settings", "--lease", "inf"),
        ("claim", "w", "--lease", "inf"),
        ("enqueue", "--delay", "nan", "1"),
    ):
        done = await cli(*args)
        assert done.returncode == 2 and "not a finite number" in done.stderr, (args, done.stderr)
    settings = await cli.json("settings")
    assert (settings["rate"], settings["lease"]) == (5.0, 120.0)
    assert (await cli.json("status", "--json"))["pending"] == 1
