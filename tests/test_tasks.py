"""Named tasks (simplequeue.client.tasks): registered by name, enqueued as jobs
that name them with their arguments (checked by mypy), run by a Worker that
dispatches on the name."""

from __future__ import annotations

import asyncio
import functools
import logging
import textwrap
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import mypy.api
import pytest

from simplequeue.client import Client, Done, Job, Task, Tasks, Worker
from simplequeue.errors import UnknownTask
from simplequeue.objstore.memfs import MemStore
from tests.helpers.bounded_run import run_bounded

StartBroker = Callable[..., Awaitable[Any]]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def broker(start_broker: StartBroker) -> Any:
    return await start_broker(MemStore())


@pytest.fixture
async def q(broker: Any) -> Any:
    async with Client(broker.url, topic="tasks") as client:
        yield client


async def run_until_settled(worker: Worker, broker: Any, q: Client, n: int) -> None:
    """Run the worker until `n` jobs are completed or dead, then stop it."""
    task = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(30):
            while True:
                counts = await q.status()
                if counts["completed"] + counts["dead"] >= n:
                    break
                await broker.committer.wait_changed(q.topic, 1.0)
    finally:
        await worker.stop()
        await task


def test_a_task_stays_callable_as_itself() -> None:
    tasks = Tasks()

    @tasks.task
    def add(a: int, b: int = 1) -> int:
        """Adds."""
        return a + b

    @tasks.task(name="mul.async")
    async def mul(a: int, b: int) -> int:
        return a * b

    assert isinstance(add, Task) and add(2, b=3) == 5 and add.__doc__ == "Adds."
    assert asyncio.run(mul(2, 3)) == 6
    assert (add.name, mul.name) == ("add", "mul.async")
    assert set(tasks) == {"add", "mul.async"} and tasks["add"] is add and "mul" not in tasks


def test_a_name_is_registered_once() -> None:
    tasks = Tasks()

    @tasks.task
    def job() -> None: ...

    with pytest.raises(ValueError, match="already registered"):
        tasks.task(name="job")(lambda: None)


def test_an_empty_name_is_refused() -> None:
    """@tasks.task(name="") registered the function under its own name, as if
    no name were given (review of limits, control and named tasks, round 25)."""
    tasks = Tasks()

    def send() -> None: ...

    with pytest.raises(ValueError, match="cannot be empty"):
        tasks.task(name="")(send)
    assert len(tasks) == 0


@pytest.mark.parametrize("name", [123, b"send", 1.5])
def test_a_name_that_is_not_a_string_is_refused(name: object) -> None:
    """@tasks.task(name=123) registered the task under the int 123: its jobs'
    payloads named 123, which a Worker's `Tasks` (looking names up as the
    JSON strings payloads carry) never finds; mypy caught it, a script
    without it did not (review of the SDK, round 32)."""
    tasks = Tasks()

    def send() -> None: ...

    with pytest.raises(TypeError, match="a task's name must be a str"):
        tasks.task(name=name)(send)  # type: ignore[arg-type]
    assert len(tasks) == 0


@pytest.mark.parametrize("fn", [None, "send_email", 42])
def test_a_task_that_is_not_callable_is_refused_as_it_is_registered(fn: Any) -> None:
    """tasks.task(name="send")(None) registered None, and `@tasks.task("send")`
    (a name where `name=` was meant) met an AttributeError: a Worker given the
    registry failed each such job ("'NoneType' object is not callable") until
    it was dead (review of the Worker, round 34). TypeError as it is
    registered, as Worker(q, None) is refused."""
    tasks = Tasks()
    with pytest.raises(TypeError, match=r"a task must be callable, not (NoneType|str|int)"):
        tasks.task(name="send")(fn)
    if fn is not None:  # tasks.task(None) is tasks.task(): the decorator
        with pytest.raises(TypeError, match=r"a task must be callable"):
            tasks.task(fn)
    assert len(tasks) == 0


def test_a_callable_with_no_name_needs_one_as_it_is_registered() -> None:
    """`tasks.task(functools.partial(send, "x"))` and an object with __call__
    have no __name__: registering one met an AttributeError about
    'functools.partial' (left alone in round 34). A TypeError that says to
    pass name=, and with a name it is registered."""
    tasks = Tasks()

    def send(to: str, subject: str) -> None: ...

    class Sender:
        def __call__(self, to: str) -> None: ...

    for fn in (functools.partial(send, "a@b.c"), Sender()):
        with pytest.raises(TypeError, match=r"has no __name__: register it with name="):
            tasks.task(fn)
    assert len(tasks) == 0
    assert tasks.task(name="email.send")(functools.partial(send, "a@b.c")).name == "email.send"
    assert "email.send" in tasks


async def test_enqueue_makes_a_job_that_names_the_task_and_carries_its_arguments(
    q: Client,
) -> None:
    tasks = Tasks()

    @tasks.task
    async def send_email(to: str, subject: str, cc: tuple[str, ...] = ()) -> None: ...

    job_id = await send_email.enqueue(q, "a@b.c", subject="hi")
    assert (await q.job(job_id)).payload == {
        "task": "send_email",
        "args": ["a@b.c"],
        "kwargs": {"subject": "hi"},
    }
    assert send_email.payload("x", "y", cc=("z",)) == {
        "task": "send_email",
        "args": ["x", "y"],
        "kwargs": {"cc": ("z",)},
    }
    same = await send_email.options(id="welcome", priority=5, delay=60, max_attempts=2).enqueue(
        q, "a@b.c", "welcome"
    )
    job = await q.job(same)
    assert (job.id, job.status, job.priority, job.max_attempts) == ("welcome", "delayed", 5, 2)
    assert job.payload["args"] == ["a@b.c", "welcome"]


async def test_a_worker_runs_each_job_with_the_task_it_names(q: Client, broker: Any) -> None:
    tasks = Tasks()
    threads: set[int] = set()

    @tasks.task
    async def greet(name: str, punctuation: str = "!") -> str:
        return f"hello {name}{punctuation}"

    @tasks.task(name="blocking.add")
    def add(a: int, b: int) -> int:  # a plain def: run in a thread
        threads.add(threading.get_ident())
        return a + b

    g = await greet.enqueue(q, "ada", punctuation="?")
    a = await add.enqueue(q, 2, 3)
    await run_until_settled(Worker(q, tasks, wait=0.2, handle_signals=False), broker, q, 2)
    assert await q.result(g, timeout=5) == "hello ada?"
    assert await q.result(a, timeout=5) == 5
    assert threads and threading.get_ident() not in threads


async def test_a_task_may_return_done_to_enqueue_the_next_step(q: Client, broker: Any) -> None:
    tasks = Tasks()

    @tasks.task
    async def split(text: str) -> Done:
        words = text.split()
        return Done(len(words), enqueue=[shout.payload(w) for w in words])

    @tasks.task
    def shout(word: str) -> str:
        return word.upper()

    await split.options(id="s").enqueue(q, "to be")
    await run_until_settled(Worker(q, tasks, wait=0.2, handle_signals=False), broker, q, 3)
    assert await q.result("s", timeout=5) == 2
    assert [await q.result(f"s:{i}", timeout=5) for i in range(2)] == ["TO", "BE"]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"task": "nope", "args": [1]}, "names task 'nope', which is not registered"),
        ({"photo": 1}, "is not a task"),
        ("plain text", "is not a task"),
        ({"task": "known", "args": [], "extra": 1}, "is not a task"),
    ],
)
async def test_a_job_that_is_not_a_known_task_fails_clearly_and_is_logged(
    q: Client, broker: Any, caplog: pytest.LogCaptureFixture, payload: Any, error: str
) -> None:
    tasks = Tasks()

    @tasks.task
    def known() -> None: ...

    job_id = await q.enqueue(payload, max_attempts=1)
    worker = Worker(q, tasks, wait=0.2, handle_signals=False)
    with caplog.at_level(logging.ERROR, logger="simplequeue.worker"):
        await run_until_settled(worker, broker, q, 1)
    dead = await q.job(job_id)
    assert dead.status == "dead" and dead.last_error is not None
    assert "UnknownTask" in dead.last_error and error in dead.last_error
    assert f"job {job_id} failed" in caplog.text and error in caplog.text


async def test_an_argument_that_is_no_json_value_is_refused_not_changed(q: Client) -> None:
    """A task's arguments went as msgspec encodes them: a datetime as its ISO
    text, bytes as base64, a set as a list, a dict's int keys as text. mypy
    passes `stamp.enqueue(q, datetime(...))` for `def stamp(at: datetime)`,
    and the task was called with "2024-01-02T03:04:05Z" (review of limits).
    Such an argument is refused now, TypeError naming it and its type,
    before anything is sent; tuples go as lists (JSON has one array)."""
    tasks = Tasks()

    @tasks.task
    async def stamp(at: Any, *more: Any, **named: Any) -> None: ...

    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    for args, named, said in [
        ((when,), {}, r"args\[0\] is of type datetime"),
        ((b"\x00raw",), {}, r"args\[0\] is of type bytes"),
        ((1, [2, {"s": {3}}]), {}, r"args\[1\]\[1\]\['s'\] is of type set"),
        ((1,), {"at": when}, r"kwargs\['at'\] is of type datetime"),
        (({1: "a"},), {}, r"args\[0\] has a key of type int"),
        # An int the task would get as a plain int, its Enum lost.
        ((HTTPStatus.OK,), {}, r"args\[0\] is of type HTTPStatus"),
    ]:
        with pytest.raises(TypeError, match=said):
            await stamp.enqueue(q, *args, **named)
        with pytest.raises(TypeError, match=said):
            await stamp.options(id="x").enqueue(q, *args, **named)
        with pytest.raises(TypeError, match=said):
            stamp.payload(*args, **named)
    assert (await q.status())["total"] == 0
    loops: list[Any] = [1]
    loops.append(loops)  # refused by the encoding, as before, not looked at for ever
    with pytest.raises((TypeError, ValueError, RecursionError)):
        await stamp.enqueue(q, loops)
    assert stamp.payload((1, None), {"a": [True, 2.5]})["args"] == [(1, None), {"a": [True, 2.5]}]


async def test_arguments_that_do_not_fit_the_task_fail_the_job(q: Client, broker: Any) -> None:
    tasks = Tasks()

    @tasks.task
    async def one(x: int) -> int:
        return x

    job_id = await q.enqueue({"task": "one", "args": [1, 2]}, max_attempts=1)
    await run_until_settled(Worker(q, tasks, wait=0.2, handle_signals=False), broker, q, 1)
    last_error = (await q.job(job_id)).last_error
    assert last_error is not None and "TypeError" in last_error


async def test_a_plain_def_task_raising_stop_iteration_fails_its_job_and_stop_returns(
    q: Client,
) -> None:
    """A plain-def task runs in the Worker's pool: StopIteration raised there
    (`next()` on an empty iterator) left its job running for ever, and stop()
    with it (review of the Worker, round 34). It fails the job as a RuntimeError."""
    tasks = Tasks()

    @tasks.task
    def first_row() -> Any:
        return next(iter([]))

    job_id = await first_row.options(max_attempts=1).enqueue(q)
    worker = Worker(q, tasks, wait=0.2, lease=1.0, handle_signals=False)

    async def dead() -> bool:
        return (await q.status())["dead"] >= 1

    await run_bounded(worker, dead, within=5.0)
    [job] = await q.dead()
    assert job.id == job_id and job.last_error is not None
    assert job.last_error.endswith(".first_row raised StopIteration"), job.last_error


async def test_a_task_with_a_parameter_named_client_can_be_enqueued(q: Client) -> None:
    """Task.enqueue(self, client, *args, **kwargs) took a task's argument
    `client` (the customer an invoice is for, say) for its own: TypeError
    "multiple values for argument 'client'", and mypy refused the call too
    (review of limits, control and named tasks, round 25). Its own parameters
    are positional-only now, in TaskOptions.enqueue too."""
    tasks = Tasks()

    @tasks.task
    async def invoice(amount: int, client: str) -> None: ...

    job_id = await invoice.enqueue(q, 10, client="acme")
    assert (await q.job(job_id)).payload["kwargs"] == {"client": "acme"}
    other = await invoice.options(id="x").enqueue(q, 5, client="globex")
    assert (await q.job(other)).payload["kwargs"] == {"client": "globex"}


def test_a_task_with_a_parameter_named_self_has_a_payload_and_is_called() -> None:
    """Task.payload and Task.__call__ took a task's argument `self` for the
    Task itself (review of limits, control and named tasks, round 25)."""
    tasks = Tasks()

    @tasks.task
    def method_like(self: int, other: int) -> int:
        return self + other

    assert method_like.payload(self=1, other=2) == {
        "task": "method_like",
        "args": [],
        "kwargs": {"self": 1, "other": 2},
    }
    assert method_like(self=1, other=2) == 3


def test_unknown_task_is_raised_when_called_directly() -> None:
    with pytest.raises(UnknownTask, match="its tasks: none"):
        asyncio.run(Tasks()(Job("j", payload={"task": "x"})))


# --- typing: mypy checks a task's arguments ---------------------------------------------

PROGRAM = """\
from simplequeue.client import Client, Done, Tasks

tasks = Tasks()


@tasks.task
async def send_email(to: str, subject: str, retries: int = 3) -> dict[str, str]:
    return {{"to": to}}


@tasks.task(name="resize")
def resize(photo: int) -> Done:
    return Done(photo, enqueue=[send_email.payload("a@b.c", subject="resized")])


@tasks.task
async def invoice(amount: int, client: str) -> None: ...


async def main(q: Client) -> None:
{calls}
"""

RIGHT = """\
    await send_email.enqueue(q, "a@b.c", subject="hi")
    await send_email.enqueue(q, "a@b.c", "hi", retries=1)
    await send_email.options(id="x", delay=5).enqueue(q, to="a@b.c", subject="hi")
    await resize.enqueue(q, 7)
    await invoice.enqueue(q, 10, client="acme")
    sent: dict[str, str] = await send_email("a@b.c", "hi")
    done: Done = resize(7)
"""

# Each line a mistake mypy must report.
WRONG = """\
    await send_email.enqueue(q, "a@b.c", subject=3)
    await send_email.enqueue(q, "a@b.c")
    await send_email.enqueue(q, "a@b.c", subjet="hi")
    await send_email.options(priority=1).enqueue(q, 1, "hi")
    await resize.enqueue(q, "seven")
    await resize.enqueue("not a client", 7)
    send_email.payload("a@b.c", "hi", retries="3")
"""


def test_mypy_checks_the_arguments_of_a_tasks_enqueue(tmp_path: Path) -> None:
    (tmp_path / "right.py").write_text(PROGRAM.format(calls=RIGHT))
    (tmp_path / "wrong.py").write_text(PROGRAM.format(calls=WRONG))
    config = tmp_path / "mypy.ini"
    config.write_text(
        textwrap.dedent(f"""\
            [mypy]
            strict = True
            mypy_path = {ROOT}
            follow_imports = silent
            cache_dir = {tmp_path / "cache"}
            """)
    )
    out, err, status = mypy.api.run(
        ["--config-file", str(config), str(tmp_path / "right.py"), str(tmp_path / "wrong.py")]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert not [e for e in errors if "right.py" in e], out + err
    first = PROGRAM.split("{calls}")[0].count("\n") + 1  # the line of the first call
    reported = {int(e.split(":")[1]) for e in errors if "wrong.py" in e}
    assert reported == set(range(first, first + WRONG.count("\n"))), out + err
    assert status == 1
