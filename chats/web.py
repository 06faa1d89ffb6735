"""The web app's chat pages: the index (`/`: my chats and groups, new chat), a chat (`/chats/<id>`) and a
group (`/groups/<id>`: its members and the chats in it I may see; its forms are groups.web's).

The chat page renders the latest messages; templates/static/turbo/chat.js renders their replies as
Markdown, sends prompts (/chat/prompt), stops replies (/chat/stop), loads older messages (/chat/read)
and follows the chat live over the /chat/stream WebSocket.
"""

import uuid

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_GET, require_http_methods

from accounts.web import error_page, form_error, page, sentence, signed_in, web_page
from chats import generation, selectors, services
from chats.api import ChatCreateInput
from chats.programs.registry import programs
from groups.selectors import group_get_for_member, group_members, groups_visible_to
from groups.web import INTENTS
from proxy import tools
from proxy.upstreams import models_offered
from turbo_site.core.errors import TurboError

# Messages the chat page shows at first; "Load older" fetches as many again.
PAGE_SIZE = 50
FORMER_MEMBER = "former member"


def _index_context(request: HttpRequest, **extra) -> dict:
    """My chats (newest activity first) and groups, in two queries, and what the new-chat form offers."""
    groups = list(groups_visible_to(user=request.user))
    group_names = {group.pk: group.name for group in groups}
    chats = [(chat, group_names.get(chat.group_id)) for chat in selectors.chats_visible_to(user=request.user)]
    models = models_offered(request.turbo_session.allowed_models)
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
            # A program started from the page learns who started it (the horoscope asks for user_id).
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


@web_page
@csrf_protect
@require_http_methods(["GET", "POST"])
@signed_in
def group_page(request: HttpRequest, group_id: uuid.UUID) -> HttpResponse:
    """A group of mine (a 404 page otherwise): its members and chats, and the owner's forms."""
    group = group_get_for_member(user=request.user, group_id=group_id)
    errors: dict = {}
    if request.method == "POST":
        action = INTENTS.get(request.POST.get("intent", ""))
        if action is None:
            return error_page(request, 400, "Bad request", "the form did not say what to do")
        errors = action(request, group)
        if errors.pop("left", False):
            return HttpResponseRedirect("/")
        if not errors:  # done: show the page as it now is (a reload does not send the form again)
            return HttpResponseRedirect(f"/groups/{group.pk}")
    context = {
        "group": group,
        "is_owner": group.owner_id == request.user.pk,
        "members": list(group_members(group=group)),
        "chats": list(selectors.chats_visible_to(user=request.user, group_id=group.pk)),
        "errors": errors,
        "form": {"username": request.POST.get("username", "")} if request.method == "POST" else {},
    }
    return page(request, "web/group.html", context)
