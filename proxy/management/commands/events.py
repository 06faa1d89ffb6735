"""`manage.py events prune [--days N]`: keep the event log bounded."""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from proxy.events import events_prune


class Command(BaseCommand):
    help = "Operate on the request and event log."

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="{prune}")
        prune = actions.add_parser(
            "prune",
            help="delete events older than the retention period",
            description="Delete events older than --days (default: EVENT_RETENTION_DAYS).",
        )
        prune.add_argument("--days", type=int, default=None, help="keep this many days of events")

    def handle(self, *args, action: str, **options):
        days = options["days"] if options["days"] is not None else settings.EVENT_RETENTION_DAYS
        if days < 0:
            raise CommandError("--days must be zero or more")
        deleted = events_prune(days=days)
        self.stdout.write(f"deleted {deleted} events older than {days} days")
