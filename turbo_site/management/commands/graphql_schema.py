"""`manage.py graphql_schema`: write the GraphQL schema (turbo_site.graphql) to schema.graphql, or with
`--check` say whether that file is current (exit 1 if not). Lives in turbo_site, which assembles the
schema from every app's."""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

SCHEMA_FILE = Path(settings.BASE_DIR) / "schema.graphql"


def schema_text() -> str:
    from turbo_site.graphql import schema

    return schema.as_str() + "\n"


class Command(BaseCommand):
    help = "Write the GraphQL schema to schema.graphql (--check: fail if the file differs)."

    def add_arguments(self, parser):
        parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the file is stale")
        parser.add_argument("--output", default=str(SCHEMA_FILE), help="where to write (default: schema.graphql)")

    def handle(self, *args, check: bool = False, output: str = "", **options):
        path = Path(output)
        text = schema_text()
        if check:
            current = path.read_text() if path.exists() else ""
            if current != text:
                raise CommandError(f"{path} is stale: run `manage.py graphql_schema`")
            self.stdout.write(f"{path} is current")
            return
        path.write_text(text)
        self.stdout.write(f"wrote {path}")
