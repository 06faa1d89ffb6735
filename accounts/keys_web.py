"""The web app's API keys page (`/keys`): my keys, a new key (shown once), revoking one.

The page offers the models Turbo serves and sets a new key's budget, both the model path's, which
accounts reaches through accounts.model_path (lent by proxy) rather than by importing proxy.
"""

from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.utils import timezone
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_http_methods

from accounts import keys
from accounts.api import ApiKeyCreateInput, ApiKeyIdInput, ApiKeyOutput
from accounts.model_path import key_budget_set, models_offered
from accounts.web import error_page, form_error, page, sentence, signed_in, web_page
from turbo_site.core.errors import TurboError

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
        "models": models_offered(request.turbo_session.allowed_models),
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
                    key_budget_set(key_id=api_key.pk, usd=budget_usd, period=budget_period)
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
