"""How the ``lsi`` command reports a refusal: a typed lsi error becomes one line (what was expected, what was
found, the fix) and exit status 1; ``lsi --debug ...`` (or ``LSI_DEBUG=1``) shows the full traceback instead.

A command group built with ``cls=LsiGroup`` covers every command under it, nested groups included. Output paths
are checked with :func:`check_output_path` before the work that fills them starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from lsi.errors import InputError, LsiError


class LsiGroup(click.Group):
    """A click group whose commands report :class:`~lsi.errors.LsiError` as one line unless ``--debug`` is set."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LsiError as err:
            if ctx.find_root().params.get("debug"):
                raise
            raise click.ClickException(f"{err} (lsi --debug ... shows the traceback)") from err


def check_output_path(path: Path, *, directory: bool = False) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: an existing entry of the other kind
    (a directory where a file goes, or the reverse), or a nearest existing parent that is a file or read-only.

    Example:
        >>> check_output_path(Path("/dev/null/out.json"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        lsi.errors.InputError: expected a writable place for ...; found /dev/null is not a directory. Fix: ...
    """
    kind = "directory" if directory else "file"
    if path.exists() and path.is_dir() != directory:
        raise InputError(f"a {kind} path", f"{path} is a {'file' if directory else 'directory'}",
                         f"pick another path for the {kind}")
    parent = path if directory and path.exists() else path.parent
    while not parent.exists():
        parent = parent.parent
    problem = (f"{parent} is not a directory" if not parent.is_dir()
               else f"{parent} is not writable" if not os.access(parent, os.W_OK | os.X_OK) else None)
    if problem:
        raise InputError(f"a writable place for {path}", problem, "pick another path")
