"""The web app's chat pages in a real browser: headless chromium against the live server and the fake upstream.

The fake upstream answers "echo: some words" with "some words", one word per streamed chunk; a leading
"[chunk_delay:0.15]" spaces the words out, "[scenario:gated]" holds the reply after its first word until
``upstream.release()``. `make browser-deps` installs chromium and chromedriver.
"""

import re
import uuid

import pytest
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from chats.models import Chat, Message
from conftest import SERVER_KEY
from proxy.gateway import health
from testing.browser import (
    assert_grew_word_by_word,
    assert_only_grew,
    chat_messages,
    chat_open,
    message_css,
    message_status_wait,
    prompt_newline,
    prompt_send,
    server_websockets_drop,
)

pytest_plugins = ["testing.browser"]
pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = r"/chats/[0-9a-f-]{36}"


def is_chat_path(path: str) -> bool:
    return re.fullmatch(CHAT_PATH, path) is not None


def chat_create(client, token: str, name: str) -> str:
    """A 1:1 chat made over the API (the page that makes one is tested once, in the first test)."""
    response = client.post("/chat/create", data={"name": name}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_signup_create_chat_and_the_reply_streams_word_by_word(browser, upstream):
    browser.open("/signup")
    browser.screenshot("signup")
    browser.find("#signup-form input[name=username]").send_keys("ada")
    browser.find("#signup-form input[name=password]").send_keys("correct-horse")
    browser.find("#signup-submit").click()
    browser.wait_for_path("/")
    assert browser.cookie("sess") is not None
    assert browser.find_all("#logout-form #logout"), "no logout button once signed in"
    assert browser.driver.execute_script(
        "return [...document.styleSheets].some(sheet => sheet.href && sheet.cssRules.length > 0)"
    ), "the stylesheet did not load"

    browser.find("#chat-create-form [name=name]").send_keys("First chat")
    browser.screenshot("index")
    browser.find("#chat-create-submit").click()
    path = browser.wait_for_path(is_chat_path)
    chat_id = path.removeprefix("/chats/")
    assert browser.attribute("body", "data-chat-id") == chat_id
    assert browser.text("#chat-title") == "First chat"
    browser.wait(lambda _: browser.attribute("#connection", "data-state") == "open", "the stream to open")

    words = "one two three four five six seven eight"
    message_id = prompt_send(browser, f"[chunk_delay:0.15] echo: {words}", click=True)
    browser.wait(lambda _: browser.find("#prompt").get_attribute("value") == "", "the prompt box to be emptied")
    seen = browser.watch_text(f"{message_css(message_id)} .reply", lambda text: text == words)
    assert_grew_word_by_word(seen, words)
    message_status_wait(browser, message_id, "complete")
    assert "ada" in browser.text(f"{message_css(message_id)} .prompt .author")
    assert browser.console_errors() == []

    # The page shows the same chat after a reload, and lists it on the index.
    browser.open(f"/chats/{chat_id}")
    assert browser.text(f"{message_css(message_id)} .reply") == words
    browser.open("/")
    link = browser.wait_for(f'a.chat-link[href="/chats/{chat_id}"]')
    assert link.text == "First chat"


def test_wrong_password_shows_the_error_then_login_and_logout(browser, signup):
    _, user, password = signup()
    browser.open("/login")
    browser.screenshot("login")
    browser.find("#login-form input[name=username]").send_keys(user["username"])
    browser.find("#login-form input[name=password]").send_keys("not-the-password")
    browser.find("#login-submit").click()
    error = browser.wait_for(".form-error[role=alert]")
    assert error.is_displayed() and error.text.strip(), "the error is not shown"
    assert browser.path.startswith("/login")
    assert browser.cookie("sess") is None
    browser.screenshot("login-error")

    for field, value in (("username", user["username"]), ("password", password)):
        browser.find(f"#login-form input[name={field}]").clear()
        browser.find(f"#login-form input[name={field}]").send_keys(value)
    browser.find("#login-submit").click()
    browser.wait_for_path("/")
    assert browser.cookie("sess")["httpOnly"] is True

    browser.find("#logout").click()
    browser.wait_for_path(lambda path: path.startswith("/login"))
    assert browser.cookie("sess") is None
    browser.open("/")
    browser.wait_for_path(lambda path: path.startswith("/login"))


def test_enter_sends_and_shift_enter_adds_a_line(browser, signup, client, upstream):
    token, _, _ = signup()
    chat_id = chat_create(client, token, "Lines")
    browser.sign_in(token)
    chat_open(browser, chat_id)

    box = browser.find("#prompt")
    box.send_keys("echo: line one")
    prompt_newline(browser)
    box.send_keys("line two")
    assert box.get_attribute("value") == "echo: line one\nline two", "Shift+Enter did not add a line"

    box.send_keys(Keys.ENTER)
    browser.wait(lambda _: len(chat_messages(browser)) == 1, "Enter to send the prompt")
    (message_id,) = chat_messages(browser)  # one message: Shift+Enter did not send the first line alone
    message_status_wait(browser, message_id, "complete")
    assert Message.objects.get(pk=message_id).prompt == "echo: line one\nline two"
    browser.wait(lambda _: box.get_attribute("value") == "", "the prompt box to be emptied")
    reply = browser.find(f"{message_css(message_id)} .reply").text  # as shown: a line break, or a space
    assert reply.split() == ["line", "one", "line", "two"]


def test_the_stop_button_stops_a_reply(browser, signup, client, upstream):
    token, _, _ = signup()
    chat_id = chat_create(client, token, "Stoppable")
    browser.sign_in(token)
    chat_open(browser, chat_id)
    assert not browser.find("#stop").is_enabled(), "stop is enabled with nothing streaming"

    message_id = prompt_send(browser, "[scenario:gated] echo: never finished words")
    browser.wait(lambda _: browser.text(f"{message_css(message_id)} .reply") == "never", "the first word")
    assert browser.attribute(message_css(message_id), "data-status") == "streaming"
    browser.wait(lambda _: browser.find("#stop").is_enabled(), "stop to be enabled while the reply streams")
    browser.find("#stop").click()

    message_status_wait(browser, message_id, "error")
    assert "stopped" in browser.text(f"{message_css(message_id)} .error")
    assert browser.text(f"{message_css(message_id)} .reply") == "never", "the partial reply was not kept"
    browser.wait(lambda _: not browser.find("#stop").is_enabled(), "stop to be disabled again")
    stored = Message.objects.get(pk=message_id)
    assert (stored.status, stored.error, stored.reply.strip()) == ("error", "stopped", "never")


def test_html_in_a_reply_is_shown_as_text_and_never_runs(browser, signup, client, upstream):
    token, _, _ = signup()
    chat_id = chat_create(client, token, "Hostile")
    browser.sign_in(token)
    chat_open(browser, chat_id)

    html = '<script>window.pwned=1</script> <img src=x onerror="window.pwned=1">'
    message_id = prompt_send(browser, f"echo: {html} [a trap](javascript:window.pwned=1)")
    message_status_wait(browser, message_id, "complete")
    reply = f"{message_css(message_id)} .reply"

    def assert_inert() -> None:
        text = browser.text(reply)
        assert text.startswith(html) and "a trap" in text, f"the reply shows {text!r}"
        assert browser.find(reply).is_displayed()
        made = browser.find_all(f"{message_css(message_id)} :is(script, img, iframe, [onerror])")
        assert made == [], f"elements were made from the reply: {[e.tag_name for e in made]}"
        links = [link.get_attribute("href") or "" for link in browser.find_all(f"{reply} a")]
        assert not [href for href in links if not href.startswith(("http:", "https:"))], links
        assert browser.driver.execute_script("return typeof window.pwned") == "undefined"

    assert_inert()
    browser.open(f"/chats/{chat_id}")  # nor when the page is rendered by the server
    browser.wait_for(reply)
    assert_inert()


def test_a_dropped_websocket_reconnects_and_the_reply_completes_once(browser, signup, client, upstream, turbo_server):
    token, _, _ = signup()
    chat_id = chat_create(client, token, "Flaky network")
    browser.sign_in(token)
    chat_open(browser, chat_id)
    words = "alpha beta gamma delta epsilon zeta eta theta"
    reply = "#messages .reply"

    message_id = prompt_send(browser, f"[scenario:gated] echo: {words}")
    browser.wait(lambda _: browser.text(f"{message_css(message_id)} .reply") == "alpha", "the first word")

    # The network goes: the open socket is cut and no new one can be made. The reply goes on meanwhile.
    browser.offline()
    assert server_websockets_drop(turbo_server) >= 1
    browser.wait(lambda _: browser.attribute("#connection", "data-state") == "reconnecting", "the page to see the drop")
    upstream.release()
    browser.wait(
        lambda _: Message.objects.filter(pk=message_id, status="complete").exists(), "the reply to finish upstream"
    )
    assert browser.text(f"{message_css(message_id)} .reply") == "alpha", "the page got events while offline"

    browser.online()
    seen = browser.watch_text(f"{message_css(message_id)} .reply", lambda text: text == words, timeout=30)
    assert_only_grew(seen, words)  # the missed words come back (replayed: maybe all at once), none twice
    message_status_wait(browser, message_id, "complete")
    browser.wait(lambda _: browser.attribute("#connection", "data-state") == "open", "the stream to reopen")
    assert chat_messages(browser) == [message_id]
    assert [" ".join(element.text.split()) for element in browser.find_all(reply)] == [words]

    # The new socket is live: the next reply streams in as usual, once.
    second = prompt_send(browser, "echo: still live")
    message_status_wait(browser, second, "complete")
    assert chat_messages(browser) == [message_id, second]
    assert [" ".join(element.text.split()) for element in browser.find_all(reply)] == [words, "still live"]


def test_chat_page_renders_markdown_safely_and_fits_a_phone(browser, signup, client, upstream):
    token, _, _ = signup("grace")
    chat_id = chat_create(client, token, "Release notes")
    browser.sign_in(token)
    chat_open(browser, chat_id)

    first = prompt_send(browser, "echo: Turbo streams every reply **word by word** to everyone in the chat.")
    message_status_wait(browser, first, "complete")
    box = browser.find("#prompt")
    lines = [
        "echo: Three things to try:",
        "",
        "- `make demo` for a fake upstream",
        "- a *group chat* with a friend",
        "- [the docs](https://example.com/docs), and a chat program",
    ]
    for index, line in enumerate(lines):
        if index:
            prompt_newline(browser)
        box.send_keys(line)
    box.send_keys(Keys.ENTER)
    browser.wait(lambda _: len(chat_messages(browser)) == 2, "the second message")
    second = chat_messages(browser)[-1]
    message_status_wait(browser, second, "complete")

    assert browser.text(f"{message_css(first)} .reply strong") == "word by word"
    reply = message_css(second) + " .reply"
    items = [" ".join(item.text.split()) for item in browser.find_all(f"{reply} li")]
    assert items[:2] == ["make demo for a fake upstream", "a group chat with a friend"]
    assert items[2] == "the docs, and a chat program"
    assert browser.text(f"{reply} code") == "make demo"
    assert browser.text(f"{reply} em") == "group chat"
    (link,) = browser.find_all(f"{reply} a")
    assert (link.text, link.get_attribute("href")) == ("the docs", "https://example.com/docs")
    assert {"noopener", "noreferrer"} <= set(link.get_attribute("rel").split())
    browser.driver.execute_script("document.activeElement.blur()")
    browser.screenshot("chat", readme=True)

    browser.phone()
    browser.open(f"/chats/{chat_id}")
    browser.wait_for(message_css(second))
    width = browser.driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 375, f"the chat page scrolls sideways on a phone: {width}px wide"
    assert browser.find("#prompt").is_displayed() and browser.find("#send").is_displayed()
    browser.screenshot("chat-phone")
    browser.open("/")  # the index, with its forms, fits too
    browser.wait_for("#chat-create-form")
    width = browser.driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 375, f"the index page scrolls sideways on a phone: {width}px wide"


# --- /keys and /usage ---------------------------------------------------------------------------------------


def clipboard_text(browser) -> str | None:
    """What the page's clipboard holds (None if headless chromium will not tell)."""
    return browser.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];navigator.clipboard.readText().then(done, () => done(null));"
    )


def test_a_new_key_is_shown_once_copied_and_revoked(browser, signup, client, upstream):
    token, _, _ = signup("ada")
    browser.sign_in(token)
    # Let the page use the clipboard, as a person who clicks "Copy" would allow.
    browser.driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": browser.base_url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    browser.open("/")
    browser.find('header a[href="/keys"]').click()
    browser.wait_for_path("/keys")
    browser.find("#key-create-form [name=name]").send_keys("nightly export")
    browser.find("#key-create-form input[name=models][value=gpt-4o-mini]").click()
    browser.find("#key-create-form [name=budget_usd]").send_keys("5")
    browser.find("#key-create-submit").click()
    key = browser.wait_for("code#new-key").text.strip()
    assert key.startswith("tk-"), key
    assert browser.path == "/keys", "the key page must not move the key into a URL"
    assert "will not be shown again" in browser.text("main")
    prefix = browser.attribute("table#keys tr.key", "data-prefix")
    assert key.startswith(prefix)

    browser.find("#copy-key").click()
    browser.wait(lambda _: browser.attribute("#copy-key", "data-state") == "copied", "the Copied state")
    assert browser.text("#copy-key") == "Copied"
    assert clipboard_text(browser) == key, "the Copy button did not put the key on the clipboard"
    browser.driver.execute_script("document.activeElement.blur()")
    browser.screenshot("keys")
    assert browser.console_errors() == []
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    # Once away from that page, the key is gone for good; the row stays, then goes with Revoke.
    browser.open("/keys")
    assert not browser.find_all("#new-key") and key not in browser.driver.page_source
    assert browser.text(f'tr.key[data-prefix="{prefix}"] .key-budget') == "5 USD a month"
    browser.find(f'tr.key[data-prefix="{prefix}"] button.revoke-key').click()
    browser.wait(lambda _: not browser.find_all(f'tr.key[data-prefix="{prefix}"]'), "the revoked key's row to go")
    assert browser.path == "/keys"
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401

    browser.phone()
    browser.open("/keys")
    browser.wait_for("#key-create-form")
    width = browser.driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 375, f"the keys page scrolls sideways on a phone: {width}px wide"


def test_the_usage_page_shows_a_bar_for_today_after_a_call(browser, signup, client, upstream):
    from datetime import UTC, datetime
    from decimal import Decimal

    from proxy.events import events_flush
    from proxy.models import UsageRollup

    token, user, _ = signup("grace")
    for prompt in ("echo: hello there", "echo: and again, a little longer this time"):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
        response = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
    events_flush()
    rows = UsageRollup.objects.filter(user_id=user["id"])
    requests, cost = sum(r.requests for r in rows), sum((r.cost_usd for r in rows), Decimal(0))
    assert requests == 2 and cost > 0

    browser.sign_in(token)
    browser.open("/")
    browser.find('header a[href="/usage"]').click()
    browser.wait_for_path("/usage")
    today = datetime.now(UTC).date().isoformat()
    bar = browser.wait_for(f'svg#usage-chart rect.bar[data-day="{today}"]')
    assert bar.get_attribute("data-cost") == format(cost.normalize(), "f")
    assert float(bar.get_attribute("height")) > 0 and bar.is_displayed()
    assert len(browser.find_all("svg#usage-chart rect.bar")) == 30
    assert browser.text("#usage-totals [data-total=requests]") == "2"
    assert browser.text("#usage-totals [data-total=cost_usd]") == format(cost.normalize(), "f")
    assert browser.text(f'#usage-days tr[data-day="{today}"] td') == "2"
    browser.screenshot("usage")

    browser.find('nav.spans a[href="/usage?days=7"]').click()
    browser.wait(lambda _: len(browser.find_all("svg#usage-chart rect.bar")) == 7, "seven bars")
    browser.phone()
    browser.open("/usage")
    browser.wait_for("#usage-chart")
    width = browser.driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 375, f"the usage page scrolls sideways on a phone: {width}px wide"
    browser.screenshot("usage-phone")


# The renderer itself, in the browser that runs it: a small DOM of what it builds, for exact checks.
RENDER_CASES = r"""
const done = arguments[arguments.length - 1];
import("/static/turbo/markdown.js").then(({ renderMarkdown }) => {
  const shape = (node) => node.nodeType === Node.TEXT_NODE ? node.textContent : {
    name: node.nodeName.toLowerCase(), href: node.getAttribute("href"), rel: node.getAttribute("rel"),
    target: node.getAttribute("target"), className: node.className, text: node.textContent,
    children: [...node.childNodes].map(shape) };
  done(JSON.stringify(arguments[0].map((text) => {
    const holder = document.createElement("div");
    holder.append(renderMarkdown(text, document));
    return { name: "#fragment", children: [...holder.childNodes].map(shape) };
  })));
}, (error) => done(JSON.stringify({ error: String(error) })));
"""


def test_the_markdown_renderer_keeps_html_as_text_and_links_only_http(browser):
    import json

    xss = "<script>alert(1)</script> and <img src=x onerror=alert(1)>"
    cases = [
        xss,
        "**bold** *it* `<b>code</b>`\n\n- one\n- two",
        "```html\n<script>alert(1)</script>\n```",
        "[ok](https://example.com/a) [bad](javascript:alert(1)) [data](data:text/html,x) see http://x.org.",
    ]
    browser.open("/login")  # a page of ours: the module loads under its strict CSP
    answer = json.loads(browser.driver.execute_async_script(RENDER_CASES, cases))
    assert not isinstance(answer, dict), answer
    html_text, formatted, code, links = answer

    assert [child["name"] for child in html_text["children"]] == ["p"]
    assert html_text["children"][0]["children"] == [xss]  # one text node: nothing became an element

    (paragraph, bullet_list) = formatted["children"]
    assert [child["name"] if isinstance(child, dict) else child for child in paragraph["children"]] == [
        "strong",
        " ",
        "em",
        " ",
        "code",
    ]
    assert paragraph["children"][4]["text"] == "<b>code</b>"
    assert bullet_list["name"] == "ul" and [li["children"] for li in bullet_list["children"]] == [["one"], ["two"]]

    (pre,) = code["children"]
    assert pre["name"] == "pre" and pre["children"][0]["text"] == "<script>alert(1)</script>"
    assert pre["children"][0]["className"] == "language-html"

    anchors = [child for child in links["children"][0]["children"] if isinstance(child, dict)]
    assert [a["href"] for a in anchors] == ["https://example.com/a", "http://x.org/"]
    assert all(a["rel"] == "noopener noreferrer" and a["target"] == "_blank" for a in anchors)
    text = "".join(child for child in links["children"][0]["children"] if isinstance(child, str))
    assert "[bad](javascript:alert(1))" in text and "[data](data:text/html,x)" in text


def test_rename_and_delete_a_chat(browser, signup, client, upstream):
    token, _, _ = signup()
    chat_id = chat_create(client, token, "Old name")
    browser.sign_in(token)
    chat_open(browser, chat_id)

    browser.find("#rename-chat").click()
    box = browser.wait_for("#rename-name")
    box.clear()
    box.send_keys("New name")
    browser.find("#rename-save").click()
    browser.wait(lambda _: browser.text("#chat-title") == "New name", "the title to change")
    browser.wait(lambda _: browser.find("#rename-form").get_attribute("hidden") is not None, "the form to close")
    assert Chat.objects.get(pk=chat_id).name == "New name"

    browser.driver.execute_script("window.confirm = () => true")  # the "Delete for everyone?" question
    browser.find("#delete-chat").click()
    browser.wait_for_path("/")
    assert not Chat.objects.filter(pk=chat_id).exists()
    assert not browser.find_all(f'a.chat-link[href="/chats/{chat_id}"]')
    assert browser.console_errors() == []


def test_a_member_who_does_not_own_the_chat_is_not_offered_rename_or_delete(browser, signup, client):
    owner, _, _ = signup()
    member, member_user, _ = signup()
    chat_id = chat_create(client, owner, "Shared")
    added = client.post(
        "/chat/user/add",
        data={"id": chat_id, "user_id": member_user["id"]},
        headers={"Authorization": f"Bearer {owner}"},
    )
    assert added.status_code == 200, added.text
    browser.sign_in(member)
    chat_open(browser, chat_id)
    assert not browser.find_all("#rename-chat") and not browser.find_all("#delete-chat")


def test_copy_regenerate_and_edit_a_prompt(browser, signup, client, upstream):
    token, _, _ = signup()
    chat_id = chat_create(client, token, "Actions")
    browser.sign_in(token)
    chat_open(browser, chat_id)
    first = prompt_send(browser, "echo: first answer")
    message_status_wait(browser, first, "complete")

    # Copy puts the reply's text on the clipboard (the browser's API, watched here).
    browser.driver.execute_script(
        "window.copied = []; navigator.clipboard.writeText = async (text) => { window.copied.push(text); };"
    )
    browser.find(f"{message_css(first)} .copy-reply").click()
    browser.wait(lambda d: d.execute_script("return window.copied.length") == 1, "the reply to be copied")
    assert browser.driver.execute_script("return window.copied") == ["first answer"]
    browser.wait(lambda _: browser.text(f"{message_css(first)} .copy-reply") == "Copied", "the button to say so")

    # Regenerate: the latest message is asked again (a new message in its place, the old one gone).
    second = prompt_send(browser, "echo: second answer")
    message_status_wait(browser, second, "complete")
    assert not browser.find(f"{message_css(first)} .regenerate").is_displayed()  # only on the latest
    browser.find(f"{message_css(second)} .regenerate").click()
    browser.wait(lambda _: second not in chat_messages(browser) and len(chat_messages(browser)) == 2, "a new reply")
    regenerated = chat_messages(browser)[-1]
    message_status_wait(browser, regenerated, "complete")
    assert browser.text(f"{message_css(regenerated)} .reply") == "second answer"
    assert not Message.objects.filter(pk=second).exists()

    # Edit and resend: the prompt comes back to the composer; sending replaces the message and its reply.
    browser.find(f"{message_css(first)} .edit-prompt").click()
    box = browser.find("#prompt")
    assert box.get_attribute("value") == "echo: first answer"
    assert browser.find("#editing").is_displayed()
    box.clear()
    box.send_keys("echo: edited answer")
    before = set(chat_messages(browser))
    browser.find("#send").click()
    browser.wait(
        lambda _: first not in chat_messages(browser) and set(chat_messages(browser)) - before,
        "the edited message to be replaced by a new one",
    )
    (edited,) = set(chat_messages(browser)) - before
    message_status_wait(browser, edited, "complete")
    assert browser.text(f"{message_css(edited)} .reply") == "edited answer"
    assert not browser.find("#editing").is_displayed()
    assert [m.prompt for m in Message.objects.filter(chat_id=chat_id).order_by("created_at")] == [
        "echo: second answer",
        "echo: edited answer",
    ]
    assert browser.console_errors() == []


def chat_create_with_model(browser, name: str, model: str) -> str:
    """A chat made on the index page's form with the model picked in its picker; returns its id."""
    browser.find("#chat-create-form [name=name]").send_keys(name)
    Select(browser.find("#chat-model")).select_by_value(model)
    browser.find("#chat-create-submit").click()
    return browser.wait_for_path(is_chat_path).removeprefix("/chats/")


def picker_models(browser) -> list[str]:
    return [option.get_attribute("value") for option in Select(browser.find("#chat-model")).options]


def picked_and_answered(browser, signup, offered: list[str], picked: str, prompt: str) -> str:
    """A new user's picker offers `offered`; a chat made with `picked` keeps it and answers `prompt`."""
    token, _, _ = signup()
    browser.sign_in(token)
    browser.open("/")
    assert picker_models(browser) == offered
    chat_id = chat_create_with_model(browser, f"Picked {picked}", picked)
    assert Chat.objects.get(pk=chat_id).model == picked
    message_id = prompt_send(browser, prompt)
    message_status_wait(browser, message_id, "complete")
    return message_id


def test_the_model_picker_offers_the_models_the_upstream_serves(browser, signup, upstream):
    """Zero config: the chat models the upstream lists at /models, not the aliases; the one picked answers."""
    picked_and_answered(browser, signup, ["gpt-4o-mini", "gpt-4o"], "gpt-4o", "echo: picked by hand")
    asked = [r.json()["model"] for r in upstream.requests if r.path.endswith("/chat/completions")]
    assert asked == ["gpt-4o"]
    assert browser.console_errors() == []


def test_under_a_gateway_file_the_picker_offers_its_public_names(browser, signup, upstream, settings, tmp_path):
    """TURBO_CONFIG: the gateway's public names (not the upstream's list); the one picked reaches its deployment."""
    name = f"house-{uuid.uuid4().hex[:6]}"  # health in a shared Redis is keyed by deployment id
    config = tmp_path / "turbo.yaml"
    config.write_text(
        f"upstreams: [{{name: {name}, base_url: '{upstream.url}/v1', api_key: {SERVER_KEY}}}]\n"
        "models:\n"
        f"  - {{name: house-fast, deployments: [{{upstream: {name}, model: gpt-4o-mini}}]}}\n"
        f"  - {{name: house-smart, deployments: [{{upstream: {name}, model: gpt-4o}}]}}\n"
    )
    health.forget()
    settings.TURBO_CONFIG = str(config)
    message_id = picked_and_answered(
        browser, signup, ["house-fast", "house-smart"], "house-smart", "echo: routed by name"
    )
    assert browser.text(f"{message_css(message_id)} .reply") == "routed by name"
    asked = [r.json()["model"] for r in upstream.requests if r.path.endswith("/chat/completions")]
    assert asked == ["gpt-4o"]  # house-smart's deployment
    assert browser.console_errors() == []


def test_the_favicon_shows_on_every_page_and_at_favicon_ico(browser, signup):
    browser.open("/login")
    icon = browser.attribute("link[rel=icon]", "href")
    assert icon and icon.endswith(".svg"), icon
    # The browser loads the page's icon as an image (a 404 or a wrong type would not decode).
    size = browser.driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        const image = new Image();
        image.onload = () => done([image.naturalWidth, image.naturalHeight]);
        image.onerror = () => done(null);
        image.src = document.querySelector("link[rel=icon]").href;"""
    )
    assert size and size[0] > 0 and size[1] > 0, size
    # What browsers ask for by themselves on any page (the admin, Swagger, a JSON answer): the same icon.
    browser.open("/favicon.ico")
    assert browser.driver.current_url.endswith(icon), browser.driver.current_url
    assert browser.driver.execute_script("return document.documentElement.localName") == "svg"
    token, _, _ = signup()
    browser.sign_in(token)
    browser.open("/")
    assert browser.attribute("link[rel=icon]", "href") == icon
