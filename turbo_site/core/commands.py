"""Shared plumbing for Turbo's operator commands (`manage.py users ...`, `manage.py chats ...`).

Every failure leaves as one line on stderr and a non-zero exit, never a traceback: argparse errors as
`manage.py users create: error: ...` (exit 2), domain and database errors as `CommandError: ...` (exit 1).
Output is plain text; callers pass user-supplied text through `printable` so that a crafted username or
prompt cannot send escape sequences to the operator's terminal.
"""

import argparse
import re
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

from django.core.management.base import BaseCommand, CommandError, CommandParser, DjangoHelpFormatter
from django.db import DatabaseError
from django.utils import timezone

from turbo_site.core import tracing
from turbo_site.core.errors import TurboError
from turbo_site.core.startup import process_start

# C0 and C1 control characters, except tab and newline, which callers decide about themselves.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s+")


class OneLineErrorParser(CommandParser):
    """Django's CommandParser, but a usage error is one line: `prog: error: message`, not usage + error."""

    def error(self, message):
        if self.called_from_command_line:
            self.exit(2, f"{self.prog}: error: {message}\n")
        # From call_command(): raise, as Django does, instead of exiting the caller's process.
        raise CommandError(f"Error: {message}")


class HelpFormatter(DjangoHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Django's option order, and descriptions/epilogs printed as written (they hold examples)."""


class ActionCommand(BaseCommand):
    """A command with subcommands (`manage.py users show NAME`), each handled by `handle_<action>`.

    Subclasses add their subcommands in `add_actions(actions)`; `actions.add_parser` already builds
    parsers with one-line errors. Domain errors (TurboError) and database errors become CommandError.
    """

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # BaseCommand hard-codes CommandParser and offers no hook for the class; ours adds no state and
        # changes only error(), so switching the class of the finished parser is safe.
        parser.__class__ = OneLineErrorParser
        return parser

    def add_arguments(self, parser):
        actions = parser.add_subparsers(
            dest="action",
            required=True,
            title="subcommands",
            metavar="SUBCOMMAND",
            parser_class=OneLineErrorParser,
        )
        self.add_actions(actions)  # each subclass defines add_actions

    @staticmethod
    def add_action(actions, name: str, help_text: str, description: str = "") -> CommandParser:
        """One subcommand; its description is reflowed to the terminal's width."""
        return actions.add_parser(
            name, help=help_text, description=description or help_text, formatter_class=DjangoHelpFormatter
        )

    def handle(self, *args, action: str, **options):
        process_start("command")  # log redaction, tracing, metrics: a model call here is traced and counted
        handler = getattr(self, "handle_" + action.replace("-", "_"))
        command = self.__module__.rsplit(".", 1)[-1]
        try:
            # The command's span: the parent of what it does (a program's model calls, an upstream check).
            with tracing.span(f"manage.py {command} {action}", {"turbo.command": f"{command} {action}"}):
                handler(**options)
        except TurboError as exc:
            raise CommandError(exc.message) from exc
        except DatabaseError as exc:
            # e.g. an unmigrated or unreachable database: say so in a line, not a traceback.
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CommandError(f"database error: {first_line}") from exc

    def write_lines(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.stdout.write(line)


def uuid_argument(what: str) -> Callable[[str], uuid.UUID]:
    """An argparse `type` that accepts only a UUID, naming `what` in the one-line error."""

    def parse(value: str) -> uuid.UUID:
        try:
            return uuid.UUID(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{printable(value)!r} is not a valid {what} id (a UUID)") from None

    return parse


def parse_uuid(value: str) -> uuid.UUID | None:
    """The UUID spelled by `value`, or None if it is not one."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def printable(text: str) -> str:
    """`text` with control characters (other than tab and newline) shown as escapes."""
    return _CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def one_line(text: str, width: int) -> str:
    """`text` on one line, whitespace collapsed, cut to `width` characters with an ellipsis."""
    flat = _WHITESPACE.sub(" ", printable(text)).strip()
    if len(flat) <= width:
        return flat
    return flat[: width - 1] + "…"


def when(moment: datetime | None, missing: str = "-") -> str:
    """A timestamp in the site's time zone, to the second, or `missing` if there is none."""
    if moment is None:
        return missing
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S %Z")


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines of left-aligned columns under a header, two spaces apart."""
    cells = [list(headers)] + [
        [printable(str(cell)).replace("\n", " ").replace("\t", " ") for cell in row] for row in rows
    ]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]


def fields(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """`label: value` lines with the values aligned."""
    width = max(len(label) for label, _ in pairs) + 1
    return [f"{label + ':':<{width}} {printable(value)}".rstrip() for label, value in pairs]
