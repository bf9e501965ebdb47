"""`llava-convert check` command (declared here, implemented in llava_convert/check.py)."""

from __future__ import annotations

import click


@click.command()
@click.argument("original", type=click.Path(path_type=__import__("pathlib").Path))
@click.argument("converted", type=click.Path(path_type=__import__("pathlib").Path))
def check(original, converted):
    """Compare ORIGINAL (authors' format) with CONVERTED (Hugging Face format)."""
    raise click.UsageError("check is not implemented yet")
