"""User errors: mistakes in what a user gave (a path, a flag, a value, the data), reported without a traceback.

    from llava.errors import UsagePathError, require_path
    require_path("--data", args.data)            # UsagePathError: "--data nope.json: no such file or directory ..."

``llava`` (``llava/cli.py``) prints any :class:`UsageError` as one line ``llava <cmd>: error: <message>`` on stderr
and exits with code 2; every other exception is a real fault and keeps its traceback. ``llava --debug <cmd>`` or
``LLAVA_DEBUG=1`` shows the traceback of user errors too. The subclasses are also ``FileNotFoundError`` /
``ValueError``, so code that catches those keeps working. Messages name the flag and say what to do.
This module imports nothing heavy: the CLI uses it before torch is loaded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path


class UsageError(Exception):
    """A mistake in the user's input; the message is one line that names the flag and says what to do."""


class UsagePathError(UsageError, FileNotFoundError):
    """A path given by the user does not exist or is not what it should be."""


class UsageValueError(UsageError, ValueError):
    """A flag value, a combination of flags or the data is wrong."""


class RaiseOnUsageError:
    """argparse mixin: report a parse error by raising :class:`UsageError` (one line from ``llava``) instead of
    printing the whole usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{message} (`{self.prog} --help` lists the flags)")


class ArgumentParser(RaiseOnUsageError, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose mistakes (and its subparsers') become :class:`UsageError`."""


def require_path(flag: str, value: str | os.PathLike, *, kind: str = "any", hint: str = "") -> Path:
    """``value`` as a Path if it exists (``kind``: ``"file"``, ``"dir"`` or ``"any"``), else ``UsagePathError``."""
    path = Path(value).expanduser()
    if not path.exists():
        raise UsagePathError(f"{flag} {value}: no such {_KIND_NAMES[kind]}{'; ' + hint if hint else ''}")
    if kind == "file" and not path.is_file():
        raise UsagePathError(f"{flag} {value} is a directory, not a file{'; ' + hint if hint else ''}")
    if kind == "dir" and not path.is_dir():
        raise UsagePathError(f"{flag} {value} is a file, not a directory{'; ' + hint if hint else ''}")
    return path


_KIND_NAMES = {"file": "file", "dir": "directory", "any": "file or directory"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def require_model_path(flag: str, value: str, *, hint: str = "give the directory of a Hugging Face checkpoint") -> None:
    """A model directory, or a Hub id that ``from_pretrained`` can still resolve (online, or in the local cache).

    A value that cannot be a Hub id (absolute, ``./``, ``~``, more than one ``/``) must exist; with ``HF_HUB_OFFLINE``
    set, a Hub id must be in the cache. Anything else is left to ``from_pretrained``. A local path must be a
    directory holding ``config.json`` (a model saved with ``save_pretrained``)."""
    path = Path(value).expanduser()
    if path.is_file():
        raise UsagePathError(f"{flag} {value} is a file, not a directory; {hint}")
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsagePathError(f"{flag} {value} has no config.json, so it is no model directory; {hint}")
        return
    if not _HUB_ID.match(value) or ".." in value:
        raise UsagePathError(f"{flag} {value}: no such directory; {hint}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        # `llava --help` imports this module: huggingface_hub only to look up a hub id
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            raise UsagePathError(f"{flag} {value}: no such directory, and not in the Hugging Face cache "
                                 f"(HF_HUB_OFFLINE is set); {hint}")


def debug_requested() -> bool:
    return os.environ.get("LLAVA_DEBUG", "").lower() not in ("", "0", "false", "no")


def report_usage_errors(command: str, run: Callable[[], int], *, debug: bool | None = None) -> int:
    """``run()``'s exit code; a ``UsageError`` is printed as ``llava COMMAND: error: ...`` and gives 2 (re-raised
    when ``debug``, default ``LLAVA_DEBUG``). Every other exception propagates with its traceback."""
    try:
        return run()
    except UsageError as err:
        if debug_requested() if debug is None else debug:
            raise
        print(f"llava{' ' + command if command else ''}: error: {err}", file=sys.stderr)
        return 2


def one_line(text: str) -> str:
    """Collapse a multi-line message (a YAML parser's, say) into one line."""
    return " ".join(str(text).split())
