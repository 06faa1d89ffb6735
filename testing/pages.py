"""Helpers for tests of the web app's pages over real HTTP: a browser-like client, its forms, and an
HTML reader that answers simple CSS selectors (the standard library's parser; no browser)."""

import re
from html.parser import HTMLParser

import httpx
import pytest

from conftest import unique_name

PASSWORD = "correct-horse"
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Element:
    def __init__(self, tag: str, attrs: dict, parent: "Element | None"):
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list = []

    def __repr__(self) -> str:
        return f"<{self.tag} {self.attrs}>"

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    @property
    def text(self) -> str:
        """The element's text as a browser shows it: entities decoded, tags gone (whitespace kept)."""
        return "".join(child if isinstance(child, str) else child.text for child in self.children)

    def get(self, name: str, default=None):
        return self.attrs.get(name, default)

    def descendants(self):
        for child in self.children:
            if isinstance(child, Element):
                yield child
                yield from child.descendants()

    def select(self, selector: str) -> list["Element"]:
        """Elements matching `selector`: compounds of tag, #id, .class, [attr] and [attr=value], joined by
        spaces (descendant); several selectors separated by commas."""
        found = []
        for part in selector.split(","):
            compounds = [_compound(text) for text in part.split()]
            found.extend(element for element in self.descendants() if _matches(element, compounds))
        return found

    def select_one(self, selector: str) -> "Element":
        found = self.select(selector)
        assert len(found) == 1, f"{selector!r}: {len(found)} elements"
        return found[0]


_COMPOUND = re.compile(r"([a-z0-9]+)|#([\w-]+)|\.([\w-]+)|\[([\w-]+)(?:=\"?([^\]\"]*)\"?)?\]")


def _compound(text: str) -> list[tuple]:
    parts = []
    position = 0
    for match in _COMPOUND.finditer(text):
        assert match.start() == position, f"unsupported selector {text!r}"
        parts.append(match.groups())
        position = match.end()
    assert position == len(text), f"unsupported selector {text!r}"
    return parts


def _matches_compound(element: Element, compound: list[tuple]) -> bool:
    for tag, id_, class_, attribute, value in compound:
        if tag and element.tag != tag:
            return False
        if id_ and element.get("id") != id_:
            return False
        if class_ and class_ not in element.classes:
            return False
        if attribute and (attribute not in element.attrs or (value is not None and element.get(attribute) != value)):
            return False
    return True


def _matches(element: Element, compounds: list) -> bool:
    if not _matches_compound(element, compounds[-1]):
        return False
    ancestor, remaining = element.parent, compounds[:-1]
    while remaining and ancestor is not None:
        if _matches_compound(ancestor, remaining[-1]):
            remaining = remaining[:-1]
        ancestor = ancestor.parent
    return not remaining


class _Reader(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {name: value if value is not None else "" for name, value in attrs}, self.current)
        self.current.children.append(element)
        if tag not in VOID_TAGS:
            self.current = element

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Element(tag, dict(attrs), self.current))

    def handle_endtag(self, tag):
        element = self.current
        while element is not None and element.tag != tag:
            element = element.parent
        if element is not None and element.parent is not None:
            self.current = element.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse_page(html: str) -> Element:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.root


def page_of(response: httpx.Response) -> Element:
    assert response.headers["content-type"].startswith("text/html"), response.text[:300]
    return parse_page(response.text)


# --- a browser, as far as HTTP goes ---------------------------------------------------------------


def post_form(browser: httpx.Client, path: str, data: dict, *, referer: str | None = None) -> httpx.Response:
    """POST a page's form as a browser does: the CSRF token from its cookie, and a same-site Referer."""
    form = {"csrfmiddlewaretoken": browser.cookies["csrftoken"], **data}
    return browser.post(path, data=form, headers={"Referer": f"{browser.base_url}{referer or path}"})


def sign_up(browser: httpx.Client, username: str | None = None, password: str = PASSWORD) -> str:
    """Sign up through /signup (which signs the browser in); returns the username."""
    username = username or unique_name()
    assert browser.get("/signup").status_code == 200
    response = post_form(browser, "/signup", {"username": username, "password": password})
    assert response.status_code == 302, response.text
    assert response.headers["location"] == "/"
    return username


def log_in(browser: httpx.Client, username: str, password: str = PASSWORD, *, next: str = "") -> httpx.Response:
    assert browser.get("/login").status_code == 200
    return post_form(browser, "/login", {"username": username, "password": password, "next": next})


# --- fixtures: test modules import them (`from testing.pages import browsers, person`) ---------


@pytest.fixture
def browsers(new_client):
    """Makes clients that keep cookies, like separate browsers: in process in a test that runs in one
    transaction, against the live server in a transactional one (conftest's `new_client` rule)."""
    return new_client


@pytest.fixture
def person(signup, browsers):
    """A user signed up through the API, with a browser logged in as them: (token, user, browser)."""

    def make():
        token, user, password = signup()
        browser = browsers()
        assert log_in(browser, user["username"], password).status_code == 302
        return token, user, browser

    return make
