"""`manage.py users ...`: list, inspect, create users and reset their passwords.

Replaces the old admin CLI, which printed password hashes, skipped the "Personal" group on create and
left sessions alive on reset. Nothing here prints a password hash or a session token (hash).
"""

import secrets

from django.core.management.base import CommandError
from django.utils import timezone

from accounts.models import Session, User
from accounts.services import user_create, user_password_reset
from turbo_site.core.commands import ActionCommand, fields, parse_uuid, table, when, yes_no

EXAMPLES = """\
examples:
  manage.py users list
  manage.py users show alice
  manage.py users show 0b7e1c9a-3f5d-4a51-9d0c-2f0c3c1f6a11
  manage.py users create alice                  # prints a generated password once
  manage.py users create alice --password 'a long passphrase'
  manage.py users reset alice 'a new long passphrase'
"""


def _user_find(id_or_username: str) -> User:
    """The user with this id, or else with this username (any case)."""
    user_id = parse_uuid(id_or_username)
    user = User.objects.filter(pk=user_id).first() if user_id else None
    if user is None:
        user = User.objects.filter(username__iexact=id_or_username).first()
    if user is None:
        raise CommandError(f"no user with id or username {id_or_username!r}")
    return user


def _active_sessions(user_id) -> int:
    return Session.objects.filter(user_id=user_id, revoked_at__isnull=True, expires_at__gt=timezone.now()).count()


class Command(ActionCommand):
    help = "Manage Turbo users: list them, show one, create one, reset a password."

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("epilog", EXAMPLES)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_actions(self, actions) -> None:
        self.add_action(actions, "list", "List every user: id, username, name, joined, staff and active flags.")

        show = self.add_action(
            actions,
            "show",
            "Show one user: names, dates, groups and active sessions.",
        )
        show.add_argument("user", metavar="ID_OR_USERNAME", help="The user's UUID, or their username (any case).")

        create = self.add_action(
            actions,
            "create",
            'Create a user and their "Personal" group.',
            'Create a user and their "Personal" group. Without --password a strong random password is '
            "generated and printed once; it cannot be shown again.",
        )
        create.add_argument("username", help="The new username (unique regardless of case).")
        create.add_argument(
            "--password",
            help="The password to set. Omit it to get a generated one (and keep it out of shell history).",
        )

        reset = self.add_action(
            actions,
            "reset",
            "Set a user's password and end all of their sessions.",
        )
        reset.add_argument("username", help="The user's username (any case).")
        reset.add_argument("password", help="The new password.")

    def handle_list(self, **options) -> None:
        users = User.objects.order_by("date_joined", "username")
        rows = [
            (
                str(user.pk),
                user.username,
                user.get_full_name() or "-",
                when(user.date_joined),
                yes_no(user.is_staff),
                yes_no(user.is_active),
            )
            for user in users
        ]
        if not rows:
            self.stdout.write("no users")
            return
        self.write_lines(table(("ID", "USERNAME", "NAME", "JOINED", "STAFF", "ACTIVE"), rows))

    def handle_show(self, *, user: str, **options) -> None:
        found = _user_find(user)
        groups = found.group_memberships.order_by("group__name").values_list("group__name", flat=True)
        self.write_lines(
            fields(
                [
                    ("id", str(found.pk)),
                    ("username", found.username),
                    ("first name", found.first_name or "-"),
                    ("last name", found.last_name or "-"),
                    ("joined", when(found.date_joined)),
                    ("last login", when(found.last_login, missing="never")),
                    ("staff", yes_no(found.is_staff)),
                    ("active", yes_no(found.is_active)),
                    ("groups", ", ".join(groups) or "-"),
                    ("active sessions", str(_active_sessions(found.pk))),
                ]
            )
        )

    def handle_create(self, *, username: str, password: str | None, **options) -> None:
        generated = password is None
        if generated:
            password = secrets.token_urlsafe(18)
        user = user_create(username=username, password=password)
        self.stdout.write(f"created user {user.username!r} with id {user.pk}")
        if generated:
            self.stdout.write(f"generated password (shown only this once, store it now): {password}")

    def handle_reset(self, *, username: str, password: str, **options) -> None:
        user = user_password_reset(username=username, password=password)
        self.stdout.write(f"password of {user.username!r} reset; all of their sessions were revoked")
