"""The web app's chat pages: the index (`/`: my chats and groups, new chat) and a chat (`/chats/<id>`);
and the pages over the model path: my API keys (`/keys`) and my usage (`/usage`).

The chat page renders the latest messages; templates/static/turbo/chat.js renders their replies as
Markdown, sends prompts (/chat/prompt), stops replies (/chat/stop), loads older messages (/chat/read)
and follows the chat live over the /chat/stream WebSocket.
"""

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.utils import timezone
from django.utils.cache import patch_vary_headers
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_GET, require_http_methods

from accounts import keys
from accounts.api import ApiKeyCreateInput, ApiKeyIdInput, ApiKeyOutput
from accounts.web import error_page, form_error, page, sentence, signed_in, web_page
from chats import generation, selectors, services
from chats.api import ChatCreateInput
from chats.programs.registry import programs
from groups.selectors import groups_visible_to
from proxy import tools
from proxy.gateway import models_list
from proxy.upstreams import served_models
from proxy.usage.api import UsageView
from proxy.usage.budgets import budget_set
from proxy.usage.selectors import COUNTERS, usage_cost_text, usage_report_for
from turbo_site.core.errors import TurboError

# Messages the chat page shows at first; "Load older" fetches as many again.
PAGE_SIZE = 50
FORMER_MEMBER = "former member"


def _model_choices(allowed_models: frozenset[str] | None) -> list[str]:
    """The models to offer, the default first: the gateway's public names the user may use; without a
    config file, the chat models the upstream lists (those the user may use), or, if it cannot say, the
    default model and the aliases' models (or just the ones the user may use)."""
    names = [model["id"] for model in models_list(allowed_models)["data"]]
    if not names:
        served = async_to_sync(served_models)()
        if served is not None:
            names = [name for name in served if allowed_models is None or name in allowed_models]
        elif allowed_models is not None:
            names = sorted(allowed_models)
        else:
            names = [settings.DEFAULT_MODEL, *settings.MODEL_ALIASES.values()]
    if settings.DEFAULT_MODEL in names:
        names = [settings.DEFAULT_MODEL, *(name for name in names if name != settings.DEFAULT_MODEL)]
    return list(dict.fromkeys(names))


def _index_context(request: HttpRequest, **extra) -> dict:
    """My chats (newest activity first) and groups, in two queries, and what the new-chat form offers."""
    groups = list(groups_visible_to(user=request.user))
    group_names = {group.pk: group.name for group in groups}
    chats = [(chat, group_names.get(chat.group_id)) for chat in selectors.chats_visible_to(user=request.user)]
    models = _model_choices(request.turbo_session.allowed_models)
    form = {"model": settings.DEFAULT_MODEL if settings.DEFAULT_MODEL in models else (models[:1] or [""])[0]}
    form.update(extra.pop("form", {}))
    return {
        "chats": chats,
        "groups": groups,
        "models": models,
        "programs": sorted(programs()),
        "tools": sorted(tools.tool_names()),
        "form": form,
        **extra,
    }


def _chat_create(request: HttpRequest) -> HttpResponse:
    """The new-chat form: the same input and service as POST /chat/create."""
    form = {
        "name": request.POST.get("name", ""),
        "model": request.POST.get("model", ""),
        "group_id": request.POST.get("group_id", ""),
        "system_prompt": request.POST.get("system_prompt", ""),
        "program": request.POST.get("program", ""),
        "tools": request.POST.getlist("tools"),
    }
    fields = {name: value for name, value in form.items() if value or name in ("name", "tools")}
    data = ChatCreateInput(data=fields)
    if not data.is_valid():
        error = form_error(data.errors)
    else:
        session = request.turbo_session
        try:
            # A program started from the page learns who started it (seed 001's horoscope asks for user_id).
            program_context = {"user_id": str(request.user.pk)} if data.validated_data.get("program") else None
            chat = services.chat_create(
                owner=request.user,
                allowed_models=session.allowed_models,
                program_context=program_context,
                **data.validated_data,
            )
        except TurboError as exc:  # a group I am not in, a model my groups may not use, an unknown program
            error = sentence(exc.message)
        else:
            if chat.program:  # its opening turn runs now, as /chat/create does
                generation.program_open(chat=chat, user=request.user, allowed_models=session.allowed_models)
            return HttpResponseRedirect(f"/chats/{chat.pk}")
    return page(request, "web/index.html", _index_context(request, form=form, chat_error=error))


@web_page
@csrf_protect
@require_http_methods(["GET", "POST"])
@signed_in
def index_page(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        return _chat_create(request)
    return page(request, "web/index.html", _index_context(request))


@web_page
@require_GET
@signed_in
def chat_page(request: HttpRequest, chat_id: uuid.UUID) -> HttpResponse:
    """A chat and its latest messages (a 404 page for a chat the user may not see), in three queries."""
    chat = selectors.chat_get_for_member(user=request.user, chat_id=chat_id)
    messages = selectors.chat_messages(chat=chat, limit=PAGE_SIZE)
    names = {str(user.pk): user.username for user in selectors.chat_users(chat=chat)}
    rows = [(message, names.get(str(message.author_id), FORMER_MEMBER)) for message in messages]
    context = {
        "chat": chat,
        "messages": rows,
        "has_older": len(messages) == PAGE_SIZE,
        "user_names": names,
        "max_prompt_chars": settings.MAX_PROMPT_CHARS,
    }
    return page(request, "web/chat.html", context)


# --- /keys: my API keys ---------------------------------------------------------------------------
# Here rather than in accounts/web.py: the page offers the models Turbo serves and sets a key's budget,
# both of proxy, which chats may import and accounts may not.

BUDGET_PERIODS = ("day", "week", "month", "total")


def _keys_context(request: HttpRequest, **extra) -> dict:
    """My keys (newest first, never the keys themselves: their prefixes) as ApiKeyOutput shapes them,
    and what the new-key form offers."""
    api_keys = list(keys.api_keys_of(request.user))
    shaped = ApiKeyOutput(api_keys, many=True).data
    form = {"budget_period": "month", "models": []}
    form.update(extra.pop("form", {}))
    return {
        "keys": list(zip(api_keys, shaped, strict=True)),
        "now": timezone.now(),
        "models": _model_choices(request.turbo_session.allowed_models),
        "budget_periods": BUDGET_PERIODS,
        "form": form,
        **extra,
    }


def _key_create(request: HttpRequest) -> HttpResponse:
    """The new-key form: the same input, services and budget as POST /user/keys/create. On success the
    key is in this response's page, once: never in a URL, a redirect or a later page."""
    form = {
        "name": request.POST.get("name", ""),
        "expires_at": request.POST.get("expires_at", "").strip(),
        "models": request.POST.getlist("models"),
        "budget_usd": request.POST.get("budget_usd", "").strip(),
        "budget_period": request.POST.get("budget_period", "") or "month",
    }
    fields = {name: value for name, value in form.items() if value or name in ("name", "models")}
    data = ApiKeyCreateInput(data=fields)
    if not data.is_valid():
        error = form_error(data.errors)
    else:
        fields = dict(data.validated_data)
        budget_usd, budget_period = fields.pop("budget_usd", None), fields.pop("budget_period")
        try:
            with transaction.atomic():
                api_key, key = keys.api_key_create(user=request.user, **fields)
                if budget_usd is not None:
                    budget_set(scope="key", target_id=api_key.pk, usd=budget_usd, period=budget_period)
        except TurboError as exc:  # a model I may not use, too many keys, an expiry in the past
            error = sentence(exc.message)
        else:
            context = _keys_context(request, new_key=key, new_key_name=api_key.name)
            return page(request, "web/keys.html", context)
    return page(request, "web/keys.html", _keys_context(request, form=form, create_error=error))


def _key_revoke(request: HttpRequest) -> HttpResponse:
    """Revoke one of my keys (someone else's is a 404 page, as in the API), then show the list again."""
    data = ApiKeyIdInput(data={"id": request.POST.get("id", "")})
    if not data.is_valid():
        return page(request, "web/keys.html", _keys_context(request, revoke_error=form_error(data.errors)))
    keys.api_key_revoke(user=request.user, key_id=data.validated_data["id"])
    return HttpResponseRedirect("/keys")


@web_page
@csrf_protect
@require_http_methods(["GET", "POST"])
@signed_in
def keys_page(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        intent = request.POST.get("intent", "")
        if intent == "create":
            return _key_create(request)
        if intent == "revoke":
            return _key_revoke(request)
        return error_page(request, 400, "Bad request", "the form did not say what to do")
    return page(request, "web/keys.html", _keys_context(request))


# --- /usage: my usage per day ---------------------------------------------------------------------

USAGE_SPANS = (7, 30, 90)
USAGE_DEFAULT_SPAN = 30
CHART_WIDTH = 720
CHART_HEIGHT = 200
CHART_TOP = 8  # room above the highest bar


def _usage_days(days: int, now) -> tuple[datetime, list[date]]:
    """The last `days` UTC days, today included, and the midnight (UTC) they start at."""
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=days - 1)
    return datetime(first.year, first.month, first.day, tzinfo=UTC), [first + timedelta(n) for n in range(days)]


def _usage_chart(rows: list[dict]) -> dict:
    """The bars of a per-day cost chart, in the SVG's own units (drawn here, so the page needs no script)."""
    costs = [Decimal(row["cost_usd"]) for row in rows]
    highest = max(costs, default=Decimal(0))
    step = CHART_WIDTH / max(len(rows), 1)
    gap = min(step * 0.2, 4)
    room = CHART_HEIGHT - CHART_TOP
    bars = []
    for index, (row, cost) in enumerate(zip(rows, costs, strict=True)):
        height = float(cost / highest) * room if highest else 0.0
        if row["requests"] and height < 1:
            height = 1.0  # a day with calls always shows, even when they cost (next to) nothing
        bars.append(
            {
                **row,
                "x": f"{index * step + gap / 2:.2f}",
                "y": f"{CHART_HEIGHT - height:.2f}",
                "width": f"{step - gap:.2f}",
                "height": f"{height:.2f}",
            }
        )
    return {"bars": bars, "width": CHART_WIDTH, "height": CHART_HEIGHT, "highest": usage_cost_text(highest)}


@web_page
@require_GET
@signed_in
def usage_page(request: HttpRequest) -> HttpResponse:
    """My usage over the last 7, 30 (the default) or 90 days: totals, a bar per day, the same as a table.
    Read from the hourly rollups through the usage selector, never the event log."""
    try:
        days = int(request.GET.get("days", USAGE_DEFAULT_SPAN))
    except ValueError:
        days = USAGE_DEFAULT_SPAN
    if days not in USAGE_SPANS:
        days = USAGE_DEFAULT_SPAN
    now = timezone.now()
    since, day_list = _usage_days(days, now)
    report = usage_report_for(user=request.user, since=since, until=now, by="day")
    zero = {name: 0 for name in COUNTERS} | {"cost_usd": "0"}
    by_day = {row["day"]: row for row in report["rows"]}
    rows = [{**zero, **by_day.get(day.isoformat(), {}), "day": day.isoformat()} for day in day_list]
    context = {
        "days": days,
        "spans": USAGE_SPANS,
        "total": report["total"],
        "chart": _usage_chart(rows),
        "rows": list(reversed(rows)),  # the table: the newest day first
        "first_day": day_list[0],
        "last_day": day_list[-1],
    }
    return page(request, "web/usage.html", context)


_usage_api = UsageView.as_view()


@web_page
def usage(request: HttpRequest) -> HttpResponse:
    """`/usage` is both the page and the API's `GET /usage` (proxy.usage.api): a browser asking for HTML
    (with no Authorization header) gets the page; anything else (curl, scripts, fetch: `*/*`) the JSON."""
    wants_page = "HTTP_AUTHORIZATION" not in request.META and (
        request.get_preferred_type(["application/json", "text/html"]) == "text/html"
    )
    response = usage_page(request) if wants_page else _usage_api(request)
    patch_vary_headers(response, ["Accept", "Authorization"])
    return response
