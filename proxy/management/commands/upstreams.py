"""`manage.py upstreams list|check`: the model gateway's deployments and their health; which upstreams answer.

Nothing here prints an API key: base URLs lose any `user:password@`, upstream texts are redacted.
"""

import argparse
import asyncio
import json

from django.conf import settings
from django.core.management.base import CommandError

from proxy.gateway import GatewayError
from proxy.gateway.routing import gateway_config
from proxy.upstreams import (
    deployments_health,
    health_is_shared,
    models_unpriced,
    shared_health_problem,
    upstreams_check,
)
from turbo_site.core.commands import ActionCommand, one_line, table
from turbo_site.core.loops import loop_clients_close

EXAMPLES = """\
examples:
  manage.py upstreams list                 # every deployment: models, upstream, weight, state, failures, latency
  manage.py upstreams list --json
  manage.py upstreams check                # GET /models of every upstream; exit 1 if one does not answer
  manage.py upstreams check --timeout 2 --json
"""

NOT_SHARED = (
    "health is per process without REDIS_ADDRESS, so this command cannot see a running server's: "
    "its admin shows it (Proxy and event log > Upstream health)"
)


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds <= 300:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 300 seconds")
    return seconds


async def _closing(coroutine):
    """Run `coroutine`, then close this loop's clients (the upstream pool, Redis)."""
    try:
        return await coroutine
    finally:
        await loop_clients_close()


def _run(coroutine):
    try:
        return asyncio.run(_closing(coroutine))
    except GatewayError as exc:  # TURBO_CONFIG changed into something unusable
        raise CommandError(exc.message) from exc


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class Command(ActionCommand):
    help = "The model gateway's upstreams: list each deployment's health, or check that each upstream answers."

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("epilog", EXAMPLES)
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_actions(self, actions) -> None:
        listing = self.add_action(
            actions,
            "list",
            "List every deployment with its health.",
            "List every deployment: the public models it serves, its id, upstream and base URL, weight, "
            "priority, and its health: state (healthy, cooling until HH:MM:SS, or probing: one request "
            "tests it after a cooldown), failures in the last five minutes, EWMA time to first byte in "
            "ms, and requests in flight. With REDIS_ADDRESS set this is the state shared by every server "
            "process; without it health is per process and only a running server's admin shows it.",
        )
        listing.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

        check = self.add_action(
            actions,
            "check",
            "Ask every upstream for GET /models; exit 1 if any does not answer.",
            "Ask every upstream, all at once and with the server's credentials, for GET {base_url}/models. "
            "Prints, for each, whether it answered (HTTP status, milliseconds, how many models it lists, "
            "and whether each of its deployments' model names is among them) or why not, in one line. "
            "Exits 1 if any upstream is unreachable or answers with an error.",
        )
        check.add_argument(
            "--timeout",
            type=_positive_seconds,
            default=5.0,
            metavar="SECONDS",
            help="How long to wait for each upstream (default: 5).",
        )
        check.add_argument("--json", action="store_true", help="Print JSON instead of a table.")

    def handle_list(self, **options) -> None:
        is_shared = health_is_shared()
        if is_shared and (problem := _run(shared_health_problem())):
            raise CommandError(f"cannot read the shared health from Redis (REDIS_ADDRESS): {one_line(problem, 200)}")
        deployments = _run(deployments_health())
        if options["json"]:
            self._json({"health_is_shared": is_shared, "deployments": [d.as_json() for d in deployments]})
            return
        rows = [
            (
                ", ".join(deployment.models) or "-",
                deployment.id,
                deployment.upstream,
                deployment.base_url or "-",
                deployment.weight_text,
                str(deployment.priority),
                deployment.state_text if is_shared else "-",
                str(deployment.recent_failures) if is_shared else "-",
                _number(deployment.ewma_ms) if is_shared else "-",
                str(deployment.in_flight) if is_shared else "-",
                (one_line(deployment.last_error, 60) or "-") if is_shared else "-",
            )
            for deployment in deployments
        ]
        headers = (
            "MODELS",
            "DEPLOYMENT",
            "UPSTREAM",
            "BASE URL",
            "WEIGHT",
            "PRIORITY",
            "STATE",
            "FAILURES",
            "EWMA MS",
            "IN FLIGHT",
            "LAST ERROR",
        )
        self.write_lines(table(headers, rows))
        if not is_shared:
            self.stdout.write(NOT_SHARED)

    def handle_check(self, *, timeout: float, **options) -> None:
        checks = _run(upstreams_check(timeout=timeout))
        failed = [check for check in checks if not check.is_reachable]
        unpriced = models_unpriced(gateway_config(), checks)
        if options["json"]:
            self._json({"upstreams": [check.as_json() for check in checks], "unpriced_models": unpriced})
        else:
            rows = []
            for check in checks:
                if check.is_reachable:
                    listed = ", ".join(
                        f"{name} {'listed' if seen else 'NOT listed'}" for name, seen in check.listed.items()
                    )
                    result = f"reachable: {check.status} in {_number(check.ms)} ms, {_models(check.model_count)}"
                    rows.append((check.upstream, check.base_url, result + (f"; {listed}" if listed else "")))
                else:
                    # An HTTP error (a wrong key, say) is an answer, but no better for the gateway.
                    result = ("error: " if check.status else "unreachable: ") + one_line(check.problem, 200)
                    rows.append((check.upstream, check.base_url or "-", result))
            self.write_lines(table(("UPSTREAM", "BASE URL", "RESULT"), rows))
            self.stdout.write(_unpriced_text(unpriced))
        if failed:
            names = ", ".join(check.upstream for check in failed)
            raise CommandError(f"{len(failed)} of {len(checks)} upstreams failed the check: {names}")
        if not options["json"]:
            self.stdout.write(f"all {len(checks)} upstreams reachable")

    def _json(self, document: dict) -> None:
        self.stdout.write(json.dumps(document, indent=2))


def _unpriced_text(unpriced: list[str]) -> str:
    if not unpriced:
        return "every model has a price"
    if settings.UNPRICED_MODELS == "refuse":
        treated = "refused while a budget applies (UNPRICED_MODELS=refuse)"
    else:
        treated = f"counted at DEFAULT_PRICE {settings.DEFAULT_PRICE} USD per 1M tokens (input,output)"
    return f"models with no price, {treated}: {', '.join(unpriced)}"


def _models(count: int | None) -> str:
    if count is None:
        return "no model list"
    return "1 model" if count == 1 else f"{count} models"
