"""simplequeued: the broker's command line."""

from __future__ import annotations

import click


@click.command()
def main() -> None:
    """Run a simplequeue broker (not yet: the broker lands with issue 4)."""
    raise click.ClickException("the broker is not built yet")
