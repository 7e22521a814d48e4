"""first_then_retrying: a first try outside tenacity's loop, then the loop's own
policy, as if it had made that first try itself."""

from __future__ import annotations

import gc
import weakref

import pytest
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from simplequeue.retrying import first_then_retrying


class Flaky(Exception):
    """What the loops below retry."""


class Fatal(Exception):
    """What they do not."""


class Script:
    """A `once` that raises the scripted errors in turn, then answers its call count."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.calls


class Loop:
    """A factory of tenacity loops that records what it was asked and the waits."""

    def __init__(self, attempts: int = 5) -> None:
        self.attempts = attempts
        self.built: list[float] = []
        self.slept: list[float] = []

    def __call__(self, elapsed: float) -> AsyncRetrying:
        self.built.append(elapsed)

        async def sleep(seconds: float) -> None:
            self.slept.append(seconds)

        return AsyncRetrying(
            retry=retry_if_exception_type(Flaky),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(multiplier=1, min=1, max=100),
            sleep=sleep,
            reraise=False,
        )


async def test_a_first_try_that_succeeds_builds_no_loop() -> None:
    once, loop = Script(), Loop()
    assert await first_then_retrying(once, loop) == 1
    assert once.calls == 1
    assert loop.built == []


async def test_a_retried_failure_waits_as_the_loops_own_first_attempt_would() -> None:
    once, loop = Script(Flaky(), Flaky()), Loop()
    assert await first_then_retrying(once, loop) == 3
    assert once.calls == 3
    assert len(loop.built) == 1 and loop.built[0] >= 0
    # The waits after attempts 1 and 2 of the loop: the first try counts as attempt 1.
    assert loop.slept == [1, 2]


async def test_an_error_the_loop_does_not_retry_is_raised_as_is() -> None:
    fatal = Fatal("no")
    once, loop = Script(fatal), Loop()
    with pytest.raises(Fatal) as raised:
        await first_then_retrying(once, loop)
    assert raised.value is fatal
    assert once.calls == 1
    assert loop.slept == []


async def test_the_first_try_counts_towards_the_loops_stop() -> None:
    last = Flaky("third")
    once, loop = Script(Flaky("first"), Flaky("second"), last), Loop(attempts=3)
    with pytest.raises(RetryError) as raised:
        await first_then_retrying(once, loop)
    assert once.calls == 3
    assert raised.value.last_attempt.exception() is last


async def test_the_first_failure_is_let_go_once_a_retry_succeeds() -> None:
    # Its traceback holds the frames of the failed try (the committer's: the
    # batch's sealed bytes): no reference cycle may keep it until a gc pass.
    first = Flaky("first")
    gone = weakref.ref(first)
    once, loop = Script(first), Loop()
    del first
    gc.disable()
    try:
        assert await first_then_retrying(once, loop) == 2
        assert gone() is None
    finally:
        gc.enable()
