"""`manage.py keys ...`: list API keys and revoke one.

Nothing here prints a key or its hash: a key is known by its prefix (its first characters) or its id.
"""

from django.core.management.base import CommandError
from django.utils import timezone

from accounts.keys import api_key_find, api_key_revoke
from accounts.models import ApiKey, User
from turbo_site.core.commands import ActionCommand, printable, table, when

EXAMPLES = """\
examples:
  manage.py keys list
  manage.py keys list --user alice
  manage.py keys revoke tk-AbCdEfGh9                            # by prefix, as `keys list` shows it
  manage.py keys revoke 0b7e1c9a-3f5d-4a51-9d0c-2f0c3c1f6a11    # or by id
"""


def _state(key: ApiKey, now) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "live"


class Command(ActionCommand):
    help = "Manage API keys: list them, revoke one (at once, in every server process)."

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("epilog", EXAMPLES)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_actions(self, actions) -> None:
        listing = self.add_action(
            actions,
            "list",
            "List API keys, newest first: id, prefix, name, user, group, created, expires, last used, state.",
        )
        listing.add_argument("--user", metavar="NAME", help="Only the keys of this user (username, any case).")

        revoke = self.add_action(
            actions,
            "revoke",
            "Revoke one API key: it is refused at once, and its open /ws sockets close.",
        )
        revoke.add_argument("key", metavar="PREFIX_OR_ID", help="The key's prefix (as `keys list` shows it) or its id.")

    def handle_list(self, *, user: str | None, **options) -> None:
        keys = ApiKey.objects.select_related("user", "group").order_by("-created_at")
        if user is not None:
            owner = User.objects.filter(username__iexact=user).first()
            if owner is None:
                raise CommandError(f"no user named {printable(user)!r}")
            keys = keys.filter(user=owner)
        now = timezone.now()
        rows = [
            (
                str(key.pk),
                key.prefix,
                key.name,
                key.user.username,
                key.group.name if key.group else "-",
                when(key.created_at),
                when(key.expires_at, missing="never"),
                when(key.last_used_at, missing="never"),
                _state(key, now),
            )
            for key in keys
        ]
        if not rows:
            self.stdout.write("no API keys")
            return
        headers = ("ID", "PREFIX", "NAME", "USER", "GROUP", "CREATED", "EXPIRES", "LAST USED", "STATE")
        self.write_lines(table(headers, rows))

    def handle_revoke(self, *, key: str, **options) -> None:
        found = api_key_find(prefix_or_id=key)
        already = found.revoked_at is not None
        api_key_revoke(key_id=found.pk)
        what = f"API key {found.prefix} ({printable(found.name)!r}) of {printable(found.user.username)!r}"
        self.stdout.write(f"{what} was already revoked" if already else f"{what} revoked")
