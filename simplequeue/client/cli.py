"""simplequeue: the client's command line."""

from __future__ import annotations

import click


@click.group()
def main() -> None:
    """Talk to a simplequeue broker (not yet: the CLI lands with issue 5)."""
