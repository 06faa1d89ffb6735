"""`send()`: one request to the best deployment that answers, falling over while nothing has been sent.

An attempt fails over to the next deployment (within the first model's `retries`) when the upstream
cannot be reached, times out, answers 429 or 5xx, or ends its body before the first byte. Before it
hands an answer on, `send()` reads the first chunk of its body (or the whole of an error's), so a
break before the first byte is still a failover, and once the caller has an answer nothing is tried
again: the client sees the upstream's break as it happens. A 400 `context_length_exceeded` moves on
to a fallback with a larger `context_window` (and teaches Turbo the window it names, proxy.gateway.windows);
any other 4xx is the client's and is returned as is.

What real servers send that is no answer is reported as what it is, never as an unreachable upstream,
and cools nothing down, because the request caused it: an empty `200` (llama.cpp's server answers so a
streamed request it cannot serve) is a 502 `upstream_empty_answer`, or a 400 `context_length_exceeded`
when the request is known not to fit the window, or, the window unknown, when the same request asked
again unstreamed for one token is refused for its length (which teaches the window). An HTML error
page (a proxy in front of the model server) is a GatewayError `upstream_html_error` with the page's
title, in place of the page.
"""

import html
import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal

from proxy.config import Deployment, Model
from proxy.errors import Attempt, GatewayError
from proxy.gateway import client, health, windows
from proxy.gateway.routing import attempt_order, body_for, gateway_config, models_for
from proxy.usage.budgets import Reservation, call_cost_ceiling
from proxy.usage.caller import Caller
from proxy.usage.limits import limits_settle, limits_take
from proxy.usage.ratelimits import Admission, deployments_full_error, ratelimit_deployment_admit, ratelimit_release
from proxy.usage.tokens import estimate_prompt_tokens
from turbo_site.core import metrics, tracing
from turbo_site.core.acache import CachedCheck

logger = logging.getLogger("turbo.gateway")

ERROR_BODY_MAX_BYTES = 64 * 1024  # an upstream error's body is read (and passed on) up to this size


@dataclass(slots=True)
class Call:
    """A request for the gateway to deliver."""

    path: str  # after /v1/, percent-encoded as the upstream should see it
    method: str = "POST"
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # client headers to forward (never credentials)
    body: bytes = b""
    payload: dict | None = None  # the body as a JSON object, when it is one
    model: str = ""  # the public model name asked for; "" (files, batches...): the first upstream
    allowed_models: frozenset[str] | None = None  # None: any
    api_key: str | None = None  # a chat's own key, in place of the upstream's
    caller: Caller | None = None  # who the call is for (usage, budgets, rate limits); None: nobody's
    # Turbo's own call, which validates the reply: a deployment without native json_schema support gets
    # the schema as instructions (proxy.gateway.instructions). The /v1 passthrough leaves this off.
    schema_as_instructions: bool = False
    # The caller's token lookup as this process read it last, still to be confirmed on Redis (the /v1 hot
    # path: turbo_site.core.acache): confirmed before anything is taken or sent, in the admission's script.
    token_check: CachedCheck | None = None


@dataclass(slots=True)
class Answer:
    """An upstream's answer (headers arrived, first bytes read), and how it was reached."""

    response: client.Response
    deployment: Deployment
    attempts: tuple[Attempt, ...]  # every deployment tried, this one last
    model: str = ""  # the public name that served (a fallback's, a router's pick): what usage is priced by
    # What the call reserved against its caller's budgets; whoever reads the call's usage settles it.
    reservation: Reservation | None = None
    # What the call took from its rate limits; whoever reads the call's usage settles its tokens.
    admission: Admission | None = None
    span: object = None  # the answering attempt's trace span: its reader ends it (tracing.answer_end)

    @property
    def upstream_header(self) -> str:
        return self.deployment.id


def _retry_after(value: str) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 3600 else None


def error_object(body: bytes) -> dict | None:
    """The `error` object of an upstream's JSON error body, if it has one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return error if isinstance(error, dict) else None


def _log(deployment: Deployment, error: GatewayError) -> None:
    """The one log line of what a deployment sent that was no answer."""
    logger.warning("deployment %s: %s", deployment.id, error.message)
    error.is_logged = True


_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]+>")


def html_error_text(response: client.Response) -> str | None:
    """What an HTML error page says (its title, else its text), or None if the answer is not HTML."""
    body = b"".join(response.prefix)
    kind = response.header("content-type").lower()
    if "html" not in kind and not body.lstrip()[:14].lower().startswith((b"<!doctype html", b"<html")):
        return None
    found = _TITLE.search(body)
    text = found.group(1) if found else body
    text = html.unescape(_TAG.sub(" ", text.decode("utf-8", "replace")))
    return " ".join(text.split())[:200]


def _html_refusal(response: client.Response, deployment: Deployment, attempts: tuple[Attempt, ...]) -> GatewayError:
    said = html_error_text(response) or ""
    error = GatewayError(
        f"the upstream answered {response.status} with an HTML page, not the model server's answer: {said}",
        status=response.status if response.status >= 500 else 502,
        code="upstream_html_error",
        attempts=attempts,
    )
    _log(deployment, error)
    return error


async def _empty_refusal(
    call: Call,
    model: Model,
    deployment: Deployment,
    attempts: tuple[Attempt, ...],
    *,
    url: str,
    headers: dict[str, str],
    body: bytes,
) -> GatewayError:
    """An empty 200: the request is why (the one server known to do it refuses so what it cannot serve).
    When the window is not known, the same request is asked once more unstreamed, for one token: the
    server then says what it refused (a context error teaches the window, proxy.gateway.windows)."""
    window = model.context_window or windows.learned(deployment, call.model)
    if not window:
        said = await _ask_unstreamed(call, deployment, url=url, headers=headers, body=body)
        if said is not None:
            error = GatewayError(
                f"the upstream answered an empty stream; asked again unstreamed, it said: {said}",
                status=400,
                code="context_length_exceeded",
                error_type="invalid_request_error",
                attempts=attempts,
            )
            _log(deployment, error)
            return error
    needs = estimate_prompt_tokens(call.payload)
    if window and needs >= window:
        error = GatewayError(
            f"the upstream answered an empty stream: the prompt (about {needs} tokens) does not fit the model's "
            f"context window of {window} tokens",
            status=400,
            code="context_length_exceeded",
            error_type="invalid_request_error",
            attempts=attempts,
        )
    else:
        error = GatewayError(
            "the upstream answered 200 with an empty body: it could not serve this request (llama.cpp's server "
            "answers so a prompt longer than its context window)",
            status=502,
            code="upstream_empty_answer",
            attempts=attempts,
        )
    _log(deployment, error)
    return error


async def _ask_unstreamed(
    call: Call, deployment: Deployment, *, url: str, headers: dict[str, str], body: bytes
) -> str | None:
    """Send a streamed chat request that got an empty answer again, unstreamed and for one token: the
    upstream's words if it refuses it for its context length (the window learned), else None."""
    try:
        sent = json.loads(body)
    except ValueError:
        return None
    if not isinstance(sent, dict) or sent.get("stream") is not True or not isinstance(sent.get("messages"), list):
        return None
    sent = {name: value for name, value in sent.items() if name not in ("stream", "stream_options")}
    sent.pop("max_completion_tokens", None)
    sent["max_tokens"] = 1
    upstream = deployment.upstream
    response = None
    try:
        response = await client.send(
            "POST",
            url,
            {**headers, "content-type": "application/json"},
            json.dumps(sent).encode(),
            timeout=upstream.timeout,
            connect_timeout=upstream.connect_timeout,
        )
        answer = await response.read_all(ERROR_BODY_MAX_BYTES)
    except client.TransportError:
        return None
    finally:
        if response is not None:
            await response.aclose()
    error = error_object(answer) if response.status == 400 else None
    if error is None or not windows.learn_from_error(deployment, call.model, error, call.payload):
        return None
    return str(error.get("message") or "the prompt does not fit the model's context window")


def _first_upstream_plan(config) -> list[tuple[Model, Deployment]]:
    upstream = config.upstreams[0]
    return [
        (Model(name="", retries=0, cooldown_seconds=0), Deployment(id=upstream.name, upstream=upstream, model=None))
    ]


async def send(call: Call) -> Answer:
    """Deliver `call` and return the answer to pass on (maybe an upstream's error). Raises GatewayError
    when no upstream answered at all, for a model that does not exist or is not allowed, or (429
    `budget_exceeded`) when a budget of the caller cannot cover what the call may cost."""
    # 429 `rate_limited` or `budget_exceeded`; a call refused or left unanswered takes nothing from them.
    if call.model:
        admission, reservation = await limits_take(
            call.caller,
            payload=call.payload,
            cost_ceiling=lambda: call_cost_ceiling(
                call.path, call.model, call.payload, raw=call.body, content_type=call.headers.get("content-type", "")
            ),
            token_check=call.token_check,
        )
    else:
        admission, reservation = Admission(), None
        if call.token_check is not None:
            await call.token_check.confirm()
    try:
        answer = await _deliver(call, admission)
    except BaseException:
        await ratelimit_release(admission)
        if reservation is not None:
            await reservation.settle(Decimal(0))
        raise
    answer.admission = admission
    if answer.response.status >= 400:  # an upstream's error generated nothing
        await limits_settle(admission, reservation, cost=Decimal(0), tokens=0)
    else:
        answer.reservation = reservation
    return answer


async def _deliver(call: Call, admission: Admission) -> Answer:
    config = gateway_config()
    if config.is_file:
        await health.sync([deployment.id for deployment in config.deployments])
    if call.model:
        models = models_for(
            config, call.model, call.payload, call.allowed_models, schema_as_instructions=call.schema_as_instructions
        )
        plan = attempt_order(models)
        budget = models[0].retries + 1
    else:
        plan = _first_upstream_plan(config)
        budget = 1

    queue = deque(plan)
    tried: list[Attempt] = []
    kept: client.Response | None = None  # the last upstream error, passed on if nothing better comes
    kept_deployment: Deployment | None = None
    timeouts = busy = 0
    full: list[float] = []  # the seconds until each deployment at its own rate limit could take the call
    deferred: list[tuple[Model, Deployment]] = []  # half-open, with the probe claimed elsewhere
    last_resort = False
    try:
        while len(tried) < budget:
            if not queue:
                if tried or not deferred:
                    break
                queue, deferred, last_resort = deque(deferred), [], True  # nothing else: go without the probe
            model, deployment = queue.popleft()
            upstream = deployment.upstream
            if upstream.problem:
                raise GatewayError(upstream.problem, status=503, code="upstream_not_configured")
            state = health.health_of(deployment.id)
            if state.cool_until and not health.is_cooling(deployment.id) and not last_resort:
                if not await health.probe_claim(deployment.id, model.cooldown_seconds):
                    deferred.append((model, deployment))
                    continue  # another request is probing it
            if upstream.max_in_flight and health.upstream_in_flight(upstream.name) >= upstream.max_in_flight:
                busy += 1
                health.probe_release(deployment.id)
                continue
            if deployment.rpm or deployment.tpm:  # the provider's limit: go elsewhere rather than cause a 429
                wait = await ratelimit_deployment_admit(deployment, payload=call.payload, admission=admission)
                if wait:
                    full.append(wait)
                    health.probe_release(deployment.id)
                    continue

            body = body_for(
                call.payload,
                call.body,
                call.model,
                deployment,
                model,
                schema_as_instructions=call.schema_as_instructions,
            )
            url = f"{upstream.base_url}/{call.path}"
            if call.query:
                url = f"{url}?{call.query}"
            headers = {**call.headers, "accept-encoding": "identity", **upstream.auth_headers(call.api_key)}
            span = tracing.attempt_start(call, deployment, headers) if tracing.enabled else None  # + traceparent
            began = time.perf_counter()
            health.started(deployment.id, upstream.name)
            response = None
            try:
                response = await client.send(
                    call.method, url, headers, body, timeout=upstream.timeout, connect_timeout=upstream.connect_timeout
                )
                if response.status < 400:
                    is_empty = not await response.read_some() and response.status == 200 and call.model
                else:
                    await response.read_all(ERROR_BODY_MAX_BYTES)
                    is_empty = False
            except client.TransportError as exc:
                health.ended(deployment.id, upstream.name)
                if response is not None:
                    response.on_close = None
                    await response.aclose()
                timeouts += exc.timeout
                tried.append(Attempt(deployment.id, str(exc)))
                metrics.upstream_unreachable(deployment.id, model.name, call.model, exc.timeout, len(tried))
                tracing.attempt_failed(span, str(exc))
                await health.failed(deployment.id, str(exc), model.cooldown_seconds)
                continue
            except BaseException:
                health.ended(deployment.id, upstream.name)
                health.probe_release(deployment.id)
                tracing.attempt_failed(span, "cancelled")
                if response is not None:
                    await response.aclose()
                raise
            response.on_close = lambda d=deployment.id, u=upstream.name: health.ended(d, u)
            metrics.upstream_answered(response, deployment.id, model.name, call.model, began, attempt=len(tried) + 1)

            status = response.status
            if is_empty:  # the request's doing, not the deployment's: no cooldown, no other deployment
                tried.append(Attempt(deployment.id, "an empty answer"))
                tracing.attempt_failed(span, "an empty answer", status)
                health.probe_release(deployment.id)
                await response.aclose()
                raise await _empty_refusal(call, model, deployment, tuple(tried), url=url, headers=headers, body=body)
            if status == 429 or status >= 500:
                reason = f"the upstream answered {status}"
                rest = _retry_after(response.header("retry-after")) or 0
                await health.failed(
                    deployment.id, reason, max(model.cooldown_seconds, rest) if model.cooldown_seconds else 0
                )
                tried.append(Attempt(deployment.id, reason))
                tracing.attempt_failed(span, reason, status)
                if kept is not None:
                    await kept.aclose()
                kept, kept_deployment = response, deployment
                continue
            if status == 400 and windows.learn_from_error(
                deployment, call.model, error_object(b"".join(response.prefix)), call.payload
            ):
                larger = [
                    (m, d)
                    for m, d in queue
                    if m.context_window is not None and m.context_window > (model.context_window or 0)
                ]
                if larger:
                    tried.append(Attempt(deployment.id, "context_length_exceeded"))
                    tracing.attempt_failed(span, "context_length_exceeded", status)
                    await response.aclose()
                    queue = deque(larger)
                    continue
            if status < 400:
                await health.succeeded(deployment.id, (time.perf_counter() - began) * 1000)
            if kept is not None:
                await kept.aclose()
                kept = None
            is_html = status >= 400 and html_error_text(response) is not None
            tried.append(Attempt(deployment.id, "an HTML error page" if is_html else ""))
            if is_html:
                tracing.attempt_failed(span, "an HTML error page", status)
                await response.aclose()
                raise _html_refusal(response, deployment, tuple(tried))
            answer = Answer(response, deployment, tuple(tried), model.name if model.name != "*" else call.model)
            answer.span = tracing.attempt_answered(span, response)
            return answer

    except BaseException:
        if kept is not None:  # cancelled while holding an error to pass on: give its connection back
            await kept.aclose()
        raise

    if kept is not None and kept_deployment is not None:
        if html_error_text(kept) is not None:
            await kept.aclose()
            raise _html_refusal(kept, kept_deployment, tuple(tried))
        return Answer(kept, kept_deployment, tuple(tried))
    attempts = tuple(tried)
    if not tried and full and not busy:
        raise deployments_full_error(full)
    if not tried and busy:
        raise GatewayError(
            "every upstream for this model is at its limit of requests in flight; try again shortly",
            status=503,
            code="upstream_busy",
            retry_after=1,
        )
    if not tried:
        raise GatewayError("no upstream could take the request", status=503, code="upstream_unavailable", retry_after=1)
    if timeouts == len(tried):
        raise GatewayError(
            "the upstream did not answer in time", status=504, code="upstream_timeout", attempts=attempts
        )
    raise GatewayError("the upstream could not be reached", status=502, code="upstream_unreachable", attempts=attempts)
