"""The consoles that stagetrain prints through: rich, with markup off.

Almost everything printed carries text from outside the program: exception messages (gloo's contain
``[/__w/pytorch/.../pair.cc:545]``), paths, Ray and torch errors, job ids, spec values. With markup on,
rich parses such text as tags and raises ``MarkupError`` on a stray closing tag, or silently swallows
``[bold]``. So no console here reads markup, table cells and progress columns included; style is a
value (``styled``), never spliced into a string.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text

# Wide enough for the plan table when output is piped (rich would assume 80 columns).
PIPED_WIDTH = 150


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(
        stderr=stderr,
        markup=False,
        highlight=False,
        width=None if stream.isatty() else PIPED_WIDTH,
    )


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text from plain strings and ``(text, style)`` pairs: ``styled(("error:", "bold red"), " ", msg)``.
    Nothing in ``parts`` is parsed as markup."""
    return Text.assemble(*parts)


def first_line(text, limit: int = 300) -> str:
    """The first non-blank line of ``text`` (an exception's message), at most ``limit`` characters."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_line(e: BaseException) -> str:
    """``Type: first line`` of an exception; for one re-raised from a DataLoader worker ("Caught X in
    DataLoader worker process 0." and the original traceback), the original's last line, which is the
    error itself (``ValueError: data: image 25 (.../3.jpg, 200 bytes) cannot be decoded: ...``)."""
    text = str(e)
    if "Original Traceback" in text:
        return first_line(text.strip().splitlines()[-1])
    return f"{type(e).__name__}: {first_line(text)}"


def redact_url(url: str) -> str:
    """``url`` with any credentials in it shown as ``***``: ``https://user:token@host`` ->
    ``https://***@host``. For printing and logging tracking URIs and server addresses."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "***"
    if "@" not in parts.netloc:
        return str(url)
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
