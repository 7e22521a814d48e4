"""Named tasks: functions registered by name in a `Tasks` registry, enqueued as
jobs that name them with their arguments, and run by a Worker given the
registry (`Worker(q, tasks)`), which dispatches on the name.

A task's job payload is JSON, so its arguments must be JSON values too:

    {"task": "send_email", "args": ["a@b.c"], "kwargs": {"subject": "hi"}}

("args" and "kwargs" are always there when this module makes the payload, and
may be left out by other producers). An argument that is not one (a datetime,
bytes, a set) is refused before anything is sent: JSON would hand the task
something else (its ISO text, base64, a list). A payload that is not of this shape, or
names a task the registry does not have, fails its job with UnknownTask.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, ParamSpec, TypeVar, overload

import msgspec

from simplequeue.client.client import Client
from simplequeue.client.job import Job
from simplequeue.client.threads import in_thread
from simplequeue.errors import UnknownTask

P = ParamSpec("P")
R = TypeVar("R")


class TaskPayload(msgspec.Struct, forbid_unknown_fields=True):
    """The payload of a task's job; anything else is not a task."""

    task: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


def _payload(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The payload of a job that runs task `name` with these arguments.
    TypeError for an argument that is no JSON value: a plain payload goes as
    msgspec encodes it (a datetime as its ISO text, bytes as base64, a set as
    a list), and the task would be called with that, not with what it was
    given, though mypy passed the call (the task's own types say datetime)."""
    for i, arg in enumerate(args):
        _check_json(arg, f"args[{i}]", name)
    for key, arg in kwargs.items():
        _check_json(arg, f"kwargs[{key!r}]", name)
    return {"task": name, "args": list(args), "kwargs": dict(kwargs)}


# Exactly these: a subclass (an IntEnum, a StrEnum) would reach the task as
# the plain value msgspec encodes it as.
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _check_json(value: Any, where: str, task: str) -> None:
    """TypeError unless `value` is a JSON value: dicts with str keys, lists and
    tuples (an array either way), str, int, float, bool, None. `where` names
    it in the message, as the argument and the path to it inside. The walk
    makes no path unless it finds one that is not (_refusal): it runs on the
    caller's loop for every task enqueued, over payloads of up to --max-body."""
    left = [value]
    seen: set[int] = set()  # containers looked at: one that holds itself is msgspec's to refuse
    while left:
        item = left.pop()
        if type(item) in _JSON_SCALARS or id(item) in seen:
            continue
        if isinstance(item, dict):
            seen.add(id(item))
            if not all(type(key) is str for key in item):
                raise _refusal(value, where, task)
            left.extend(item.values())
        elif isinstance(item, list | tuple):
            seen.add(id(item))
            left.extend(item)
        else:
            raise _refusal(value, where, task)


def _refusal(value: Any, where: str, task: str) -> TypeError:
    """The TypeError for the first part of `value` that is no JSON value,
    found again with the path to it."""
    left = [(value, where)]
    seen: set[int] = set()
    while left:
        item, at = left.pop()
        if type(item) in _JSON_SCALARS or id(item) in seen:
            continue
        if isinstance(item, dict):
            seen.add(id(item))
            for key, inner in item.items():
                if type(key) is not str:
                    return TypeError(
                        f"task {task!r}: argument {at} has a key of type "
                        f"{type(key).__name__} ({key!r}), which JSON turns into text"
                    )
                left.append((inner, f"{at}[{key!r}]"))
        elif isinstance(item, list | tuple):
            seen.add(id(item))
            left.extend((inner, f"{at}[{i}]") for i, inner in enumerate(item))
        else:
            return TypeError(
                f"task {task!r}: argument {at} is of type {type(item).__name__}, not a JSON "
                "value (dict, list, str, int, float, bool, None): the task would get "
                "something else"
            )
    raise AssertionError("_refusal of a JSON value")  # pragma: no cover


class Task(Generic[P, R]):
    """A function registered as a task: called as itself (`send_email(...)`),
    or enqueued as a job (`await send_email.enqueue(q, ...)`), its arguments
    checked by mypy against the function's."""

    def __init__(self, fn: Callable[P, R], name: str) -> None:
        functools.update_wrapper(self, fn)  # its __name__, __doc__ and __wrapped__
        self.fn = fn
        self.name = name

    # Every method that takes a task's arguments takes its own positionally
    # only (`/`): a task may have a parameter named `self` or `client`.
    def __call__(self, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name!r}>"

    def payload(self, /, *args: P.args, **kwargs: P.kwargs) -> dict[str, Any]:
        """The payload of a job that runs this task with these arguments (for
        enqueue_many, or a follow-up: `Done(..., enqueue=[task.payload(...)])`).
        TypeError for an argument that is not a JSON value."""
        return _payload(self.name, args, kwargs)

    async def enqueue(self, client: Client, /, *args: P.args, **kwargs: P.kwargs) -> str:
        """Enqueue a job, into `client`'s topic, that runs this task with these
        arguments; return its id. For an id, priority, delay or time: `options()`.
        TypeError, nothing sent, for an argument that is not a JSON value."""
        return await client.enqueue(self.payload(*args, **kwargs))

    def options(
        self,
        *,
        id: str | None = None,
        priority: int = 0,
        delay: float = 0,
        max_attempts: int | None = None,
        run_at: float | datetime | None = None,
    ) -> TaskOptions[P]:
        """This task with the options of the jobs it enqueues, as Client.enqueue
        takes them: `await send_email.options(id="welcome-42").enqueue(q, ...)`."""
        return TaskOptions(self.name, id, priority, delay, max_attempts, run_at)


@dataclass(frozen=True)
class TaskOptions(Generic[P]):
    """A task and the options of the job it enqueues (Task.options)."""

    name: str
    id: str | None = None
    priority: int = 0
    delay: float = 0
    max_attempts: int | None = None
    run_at: float | datetime | None = None

    async def enqueue(self, client: Client, /, *args: P.args, **kwargs: P.kwargs) -> str:
        payload = _payload(self.name, args, kwargs)
        return await client.enqueue(
            payload, self.id, self.priority, self.delay, self.max_attempts, self.run_at
        )


class Tasks:
    """A registry of tasks by name, and the Worker handler that runs them: a
    coroutine function runs on the event loop, a plain one in a thread (as
    Worker handlers do); what a task returns (a Done too) acks its job."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[..., Any]] = {}

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(self, *, name: str | None = None) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Register a function as a task, named `name` or as the function is:
        `@tasks.task` or `@tasks.task(name="email.send")`. A name is registered
        once: a second task of that name is a ValueError; one that is not a
        non-empty str is refused too; and so is, TypeError, a task that is
        not callable (`@tasks.task("email.send")`: a name goes as `name=`), and
        one with no `__name__` (a functools.partial) given no `name=`."""

        def register(f: Callable[..., Any]) -> Task[..., Any]:
            if not callable(f):  # accepted, a Worker would fail each of its jobs
                raise TypeError(
                    f"a task must be callable, not {type(f).__name__} {f!r:.80}"
                    " (a task's name goes as name=...)"
                )
            if name is None and not isinstance(getattr(f, "__name__", None), str):
                raise TypeError(  # a functools.partial, an object with __call__
                    f"{type(f).__name__} {f!r:.80} has no __name__: register it with name=..."
                )
            task = Task(f, f.__name__ if name is None else name)  # "" is refused, not replaced
            if not isinstance(task.name, str):
                raise TypeError(f"a task's name must be a str, got {task.name!r}")
            if not task.name:
                raise ValueError("a task's name cannot be empty")
            if task.name in self._tasks:
                raise ValueError(f"a task named {task.name!r} is already registered")
            self._tasks[task.name] = task
            return task

        return register if fn is None else register(fn)

    def __getitem__(self, name: str) -> Task[..., Any]:
        return self._tasks[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    async def __call__(self, job: Job) -> Any:
        """Run the task `job` names with its arguments (the Worker's handler):
        UnknownTask when its payload is not a task's or names none of these."""
        task, call = self._task_of(job)
        if inspect.iscoroutinefunction(task.fn):
            return await task.fn(*call.args, **call.kwargs)
        result = await in_thread(task.fn, *call.args, **call.kwargs)
        # A plain function may hand back an awaitable (a lambda around an async def).
        return await result if inspect.isawaitable(result) else result

    def _task_of(self, job: Job) -> tuple[Task[..., Any], TaskPayload]:
        try:
            call = msgspec.convert(job.payload, TaskPayload)
        except msgspec.ValidationError as exc:
            raise UnknownTask(
                f"job {job.id!r} is not a task: its payload is not"
                f' {{"task": NAME, "args": [...], "kwargs": {{...}}}} ({exc})'
            ) from None
        task = self._tasks.get(call.task)
        if task is None:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise UnknownTask(
                f"job {job.id!r} names task {call.task!r}, which is not registered"
                f" with this worker (its tasks: {known})"
            )
        return task, call
