"""The store flags (--backend, --dir, --bucket, --prefix, --endpoint-url,
--region), defined once for both command lines: simplequeued serves the store
they name, `simplequeue --discover` finds its broker in it. Also `checked`,
which both use to check other flags' values (a token, a broker URL),
`FiniteRange`, their type for numbers of seconds, and `OneLineCommand` and
`OneLineGroup`, which tell a usage error on one line."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from simplequeue.objstore import ObjectStore, check_endpoint_url

F = TypeVar("F", bound=Callable[..., Any])
V = TypeVar("V")  # a flag's value


class UsageFailed(click.ClickException):
    """A usage error as one line, "Error: ...", with a usage error's exit status."""

    exit_code = 2


@contextlib.contextmanager
def _usage_on_one_line() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:  # no arguments at all: the help
        raise
    except click.UsageError as exc:
        # Formatted here, while its context is there to name the flag.
        raise UsageFailed(exc.format_message()) from None


class OneLineCommand(click.Command):
    """A command whose usage errors are one line, "Error: ..." (exit 2), as
    every other failure is, where click prints its usage line, a hint to try
    --help and a blank line before it: a script's log or a service's journal
    gets the reason alone, and --help still says the rest."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _usage_on_one_line():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        # A group's subcommands are resolved, parsed and run here: their usage
        # errors too.
        with _usage_on_one_line():
            return super().invoke(ctx)


class OneLineGroup(OneLineCommand, click.Group):
    """A group whose usage errors, and its commands', are one line."""


class FiniteRange(click.FloatRange):
    """click.FloatRange without nan and inf (nan passes every bound; JSON
    sends both as null, and a head holding one cannot be read back)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number is not None and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def checked(
    check: Callable[[str], str], *, empty_is_none: bool = False
) -> Callable[[click.Context, click.Parameter, str | None], str | None]:
    """A click callback passing a flag's value through `check`, whose
    ValueError becomes a usage error (exit 2, one line) naming the flag. An
    empty value is checked too (a broker's --token "" would turn auth off),
    or with `empty_is_none` taken for none (a client's --token "")."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value == "" and empty_is_none:
            return None
        if value is None:
            return value
        try:
            return check(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


BACKENDS = ("localfs", "memfs", "s3")
DEFAULT_DIR = "./simplequeue-data"


@dataclass(frozen=True)
class StoreFlags:
    """Where a store is, as the flags say."""

    backend: str = "localfs"
    dir: str = DEFAULT_DIR
    bucket: str | None = None
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def take(cls, options: dict[str, Any]) -> StoreFlags:
        """The flags' values, removed from a command's keyword arguments."""
        return cls(**{f.name: options.pop(f.name) for f in fields(cls) if f.name in options})

    def open(self) -> ObjectStore:
        """A handle on the store (not yet connected). Flags of another backend
        than the one chosen are a usage error: forgetting --backend s3 would
        run on a local directory."""
        s3_flags = {
            "--bucket": self.bucket,
            "--prefix": self.prefix,
            "--endpoint-url": self.endpoint_url,
            "--region": self.region,
        }
        given = [flag for flag, value in s3_flags.items() if value]
        if self.backend != "s3" and given:
            raise click.UsageError(f"{', '.join(given)}: for --backend s3 only")
        if self.backend != "localfs" and self.dir != DEFAULT_DIR:
            raise click.UsageError("--dir: for --backend localfs only")
        if self.backend == "memfs":
            from simplequeue.objstore.memfs import MemStore

            return MemStore()
        if self.backend == "localfs":
            from simplequeue.objstore.localfs import LocalStore

            return LocalStore(Path(self.dir).absolute())
        from simplequeue.objstore.s3 import S3Settings, S3Store

        if not self.bucket:
            raise click.UsageError("--backend s3 needs --bucket")
        return S3Store(
            S3Settings(
                bucket=self.bucket,
                prefix=self.prefix,
                endpoint_url=self.endpoint_url,
                region=self.region,
            )
        )


def env_variable(ctx: click.Context, name: str) -> str:
    """The environment variable of the flag `name` (a parameter's name)."""
    return f"{ctx.auto_envvar_prefix}_{name.upper()}"


def not_empty_in_env(ctx: click.Context, param: click.Parameter, value: V, hint: str = "") -> V:
    """`value`, unless it is the flag's default because its variable is set but
    empty: click takes that for unset, and SIMPLEQUEUE_TOPIC="$T", T unset,
    acted on topic "default" (a purge on its dead jobs), SIMPLEQUEUE_DIR=""
    served ./simplequeue-data, SIMPLEQUEUE_BROKER_ID="" ran under a random id,
    the broker's SIMPLEQUEUE_TOKEN="" without auth, where the flag given empty
    is refused. `hint`: what to do instead, said after the refusal."""
    name = param.name or ""
    variable = env_variable(ctx, name)
    if ctx.get_parameter_source(name) is ParameterSource.DEFAULT and (
        os.environ.get(variable) == ""
    ):
        raise click.BadParameter(f"{variable} is set but empty{hint}", param=param)
    return value


def _non_empty_dir(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An empty --dir (`--dir "$DATA"`, the variable unset) is a usage error:
    it would be the current directory, the store written or searched there."""
    if not_empty_in_env(ctx, param, value) == "":
        raise click.BadParameter("cannot be empty (give '.' for the current directory)")
    return value


def store_options(backends: tuple[str, ...] = BACKENDS) -> Callable[[F], F]:
    """Click options for the store flags; the command receives them as keyword
    arguments, which StoreFlags.take() gathers."""
    options = [
        click.option(
            "--backend",
            type=click.Choice(backends),
            default="localfs",
            show_default=True,
            help="Where topics are stored.",
        ),
        click.option(
            "--dir",
            default=DEFAULT_DIR,
            show_default=True,
            # Made if missing; a file there is refused now, not at every write.
            type=click.Path(file_okay=False),
            callback=_non_empty_dir,
            help="localfs directory.",
        ),
        click.option("--bucket", default=None, help="s3 bucket."),
        click.option("--prefix", default="", help="s3 key prefix."),
        click.option(
            "--endpoint-url",
            default=None,
            callback=checked(check_endpoint_url),
            help="s3 endpoint (LocalStack, MinIO), as http://HOST:PORT.",
        ),
        click.option("--region", default=None, help="s3 region."),
    ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate
