"""`manage.py usage [--since 7d] [--until T] [--by user|group|model|key|day]`: usage and cost, as a table."""

import argparse

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError
from django.utils import timezone

from accounts.models import ApiKey, User
from proxy.usage.selectors import moment_parse, usage_report, usage_rollups
from turbo_site.core.commands import HelpFormatter, OneLineErrorParser, table

BY = ("user", "group", "model", "key", "day")
NUMBERS = ("requests", "input_tokens", "output_tokens", "cached_tokens", "cost_usd", "estimated_requests")
HEADERS = ("requests", "input", "output", "cached", "cost_usd", "estimated")


def _moment(text: str):
    try:
        return moment_parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(by: str, ids: list[str]) -> dict[str, str]:
    """What to call each user, group or key in the table (its id when it is gone)."""
    ids = [value for value in ids if value]
    if by == "user":
        return {str(pk): name for pk, name in User.objects.filter(pk__in=ids).values_list("pk", "username")}
    if by == "group":
        group_model = apps.get_model("groups", "Group")  # groups sit above proxy: by name, not imported
        return {str(pk): name for pk, name in group_model.objects.filter(pk__in=ids).values_list("pk", "name")}
    if by == "key":
        keys = ApiKey.objects.filter(pk__in=ids).values_list("pk", "prefix", "name")
        return {str(pk): f"{prefix} ({name})" for pk, prefix, name in keys}
    return {}


class Command(BaseCommand):
    help = "Usage and cost of model calls, from the hourly rollups, per user, group, model, API key or day."

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.__class__ = OneLineErrorParser  # one-line usage errors, as turbo_site.core.commands does
        return parser

    def add_arguments(self, parser):
        parser.add_argument("--since", type=_moment, default="7d", help="7d, 24h, 2w, a date or a date-time (7d)")
        parser.add_argument("--until", type=_moment, default=None, help="the end, excluded (now)")
        parser.add_argument("--by", choices=BY, default="user", help="one row per user, group, model, key or day")

    def handle(self, *args, since, until, by, **options):
        until = until or timezone.now()
        if since >= until:
            raise CommandError("--since must be before --until")
        try:
            report = usage_report(rows=usage_rollups(since=since, until=until), by=by)
            column = {"user": "user_id", "group": "group_id", "key": "key_id"}.get(by, by)
            names = _names(by, [row[column] for row in report["rows"]])
        except DatabaseError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CommandError(f"database error: {first_line}") from exc
        none = {"group": "(no group)", "key": "(no key)", "user": "(no user)"}.get(by, "-")
        rows = [
            [names.get(row[column], row[column]) if row[column] else none, *(str(row[name]) for name in NUMBERS)]
            for row in report["rows"]
        ]
        rows.append(["total", *(str(report["total"][name]) for name in NUMBERS)])
        self.stdout.write(f"usage from {since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC, by {by}")
        for line in table([by, *HEADERS], rows):
            self.stdout.write(line)
