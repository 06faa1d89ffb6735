"""`manage.py budgets ...`: set, list and clear spending limits of users, groups and API keys."""

import argparse
from decimal import Decimal, InvalidOperation

from django.apps import apps
from django.core.management.base import CommandError

from proxy.models import Budget
from proxy.usage.budgets import budget_clear, budget_set, budget_spent
from turbo_site.core.commands import ActionCommand, parse_uuid, printable, table, when

EXAMPLES = """\
examples:
  manage.py budgets set --user alice --usd 5 --period month
  manage.py budgets set --group 5f0c8a9e-8f3b-4d8e-9a43-2b7f1f0e3c21 --usd 100 --period week
  manage.py budgets set --key tk-AbCdEfGh9 --usd 1 --period total
  manage.py budgets list
  manage.py budgets clear --user alice
"""


def _usd(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{printable(value)!r} is not an amount of dollars") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError("the amount must be zero or more")
    return amount


def _target(options) -> tuple[str, object]:
    """(scope, the target's id) from --user NAME, --group ID or --key PREFIX."""
    if options.get("user"):
        user = apps.get_model("accounts", "User").objects.filter(username=options["user"]).first()
        if user is None:
            raise CommandError(f"no user named {printable(options['user'])!r}")
        return "user", user.pk
    if options.get("group"):
        group_id = parse_uuid(options["group"])
        group = apps.get_model("groups", "Group").objects.filter(pk=group_id).first() if group_id else None
        if group is None:
            raise CommandError(f"no group with id {printable(options['group'])!r}")
        return "group", group.pk
    keys = apps.get_model("accounts", "ApiKey").objects.filter(prefix=options["key"], revoked_at__isnull=True)
    found = list(keys[:2])
    if len(found) != 1:
        raise CommandError(f"no single live API key with prefix {printable(options['key'])!r}")
    return "key", found[0].pk


def _describe(budget: Budget) -> str:
    if budget.scope == "user":
        return f"user {budget.user.username}"
    if budget.scope == "group":
        return f"group {budget.group.name} ({budget.group_id})"
    return f"key {budget.key.prefix} ({budget.key.name})"


class Command(ActionCommand):
    help = "Set, list and clear budgets: spending limits in USD per day, week, month or in total."

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("epilog", EXAMPLES)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_actions(self, actions) -> None:
        def target_arguments(parser):
            group = parser.add_mutually_exclusive_group(required=True)
            group.add_argument("--user", metavar="NAME", help="A user, by username.")
            group.add_argument("--group", metavar="ID", help="A group, by id.")
            group.add_argument("--key", metavar="PREFIX", help="An API key, by its prefix (tk-...).")

        setter = self.add_action(
            actions,
            "set",
            "Set (or replace) the budget of a user, a group or an API key.",
            "Set (or replace) the budget of a user, a group or an API key. Periods are aligned to UTC: a day "
            "starts at midnight, a week on Monday, a month on the 1st; `total` never resets.",
        )
        target_arguments(setter)
        setter.add_argument("--usd", type=_usd, required=True, help="The limit in US dollars, e.g. 5 or 0.50.")
        setter.add_argument("--period", choices=Budget.Period.values, default="month", help="Default: month.")
        self.add_action(actions, "list", "List every budget with what its period has spent so far.")
        clear = self.add_action(actions, "clear", "Remove the budget of a user, a group or an API key.")
        target_arguments(clear)

    def handle_set(self, *, usd: Decimal, period: str, **options) -> None:
        scope, target = _target(options)
        budget = budget_set(scope=scope, target_id=target, usd=usd, period=period)
        self.stdout.write(f"{_describe(budget)}: ${budget.limit_usd.normalize():f} per {budget.period}")

    def handle_list(self, **options) -> None:
        rows = []
        for budget in Budget.objects.select_related("user", "group", "key").order_by("scope", "created_at"):
            spent, resets_at = budget_spent(budget)
            rows.append(
                (
                    _describe(budget),
                    f"${budget.limit_usd.normalize():f}",
                    budget.period,
                    f"${spent.normalize():f}",
                    when(resets_at, "never"),
                )
            )
        if not rows:
            self.stdout.write("no budgets")
            return
        self.write_lines(table(("FOR", "LIMIT", "PERIOD", "SPENT", "RESETS"), rows))

    def handle_clear(self, **options) -> None:
        scope, target = _target(options)
        if not budget_clear(scope=scope, target_id=target):
            raise CommandError("there is no such budget")
        self.stdout.write("budget removed")
