"""Real-browser tests of the web app: Debian's headless chromium driven by Selenium.

A test module loads these fixtures with ``pytest_plugins = ["testing.browser"]``, then asks for
``browser`` (and ``second_browser`` for a second user): each is a :class:`Browser` on the live test server
(``turbo_server``), light theme, a 1280x900 viewport and no cookies. The chromium processes are shared by
the tests of a module (starting one takes a second or two); a test gets them cleaned, never half-used.

Screenshots go to ``$BROWSER_ARTIFACTS`` (default: a pytest temporary folder), and so do a screenshot, the
HTML and the console of every browser of a failed test.

(PYTEST_DONT_REWRITE: the test modules import the helpers below before pytest loads this module as their
plugin, too late to rewrite its asserts; they carry their own messages instead.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    JavascriptException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

__all__ = [
    "Browser",
    "assert_grew_word_by_word",
    "assert_only_grew",
    "browser_start",
    "chat_messages",
    "chat_open",
    "message_css",
    "message_status_wait",
    "prompt_newline",
    "prompt_send",
    "server_websockets_drop",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
README_SCREENSHOTS = PROJECT_ROOT / "templates" / "static" / "turbo" / "screenshots"
CHROMIUM_ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900")
DESKTOP = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}
# What a condition may raise while a page is being replaced by the next: it is tried again.
PAGE_CHANGING = (NoSuchElementException, StaleElementReferenceException, JavascriptException)
WAIT_SECONDS = 15  # generous: CI machines have two cores and run a server, an upstream and chromium


def browser_start() -> WebDriver:
    """A headless Debian chromium through its chromedriver; fails (never skips) when either is missing."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        missing = " and ".join(
            name for name, path in (("chromium", chromium), ("chromedriver", chromedriver)) if not path
        )
        pytest.fail(f"the browser tests need {missing} on PATH: run `make browser-deps`", pytrace=False)
    options = webdriver.ChromeOptions()
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Network.enable", {})
    return driver


def server_websockets_drop(server: Any) -> int:
    """Cut every WebSocket the live test server holds, as a failing network would: no close frame, the
    browser sees code 1006. Returns how many were cut. (uvicorn keeps its open connections in
    ``server_state.connections``; each protocol object has its transport and loop.)"""
    dropped = 0
    for connection in list(server.server.server_state.connections):
        if type(connection).__module__.startswith("uvicorn.protocols.websockets") and connection.transport:
            connection.loop.call_soon_threadsafe(connection.transport.abort)
            dropped += 1
    return dropped


class Browser:
    """One chromium pointed at the live server, with the waits and look-ups the tests share."""

    def __init__(self, driver: WebDriver, base_url: str, artifacts: Path, name: str) -> None:
        self.driver = driver
        self.base_url = base_url
        self.artifacts = artifacts
        self.name = name

    # --- state between tests ------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to a fresh visitor: no page (so no WebSocket), no cookies, online, light, 1280x900."""
        self.driver.get("about:blank")
        self.driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
        self.online()
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", DESKTOP)
        self.driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]}
        )
        self.driver.get_log("browser")  # forget the console of the previous test

    def phone(self, width: int = 375, height: int = 812) -> None:
        """Lay pages out as a phone of this width would (a mobile viewport: the page's meta viewport counts)."""
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True}
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)

    def offline(self) -> None:
        """No new connection succeeds (open ones are left as they are: see server_websockets_drop)."""
        self._network(offline=True)

    def online(self) -> None:
        self._network(offline=False)

    def _network(self, *, offline: bool) -> None:
        conditions = {"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
        self.driver.execute_cdp_cmd("Network.emulateNetworkConditions", conditions)

    # --- pages ----------------------------------------------------------------------------------------------------

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    @property
    def path(self) -> str:
        """The current URL's path and query (the server's origin taken off)."""
        return self.driver.current_url.removeprefix(self.base_url)

    def sign_in(self, token: str) -> None:
        """Be signed in with this session token, as /login would leave the browser (the `sess` cookie)."""
        cookie = {"name": "sess", "value": token, "url": self.base_url + "/", "httpOnly": True, "sameSite": "Lax"}
        self.driver.execute_cdp_cmd("Network.setCookie", cookie)

    def navigation_status(self) -> int:
        """The HTTP status of the page now shown."""
        return self.driver.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus")

    def cookie(self, name: str) -> dict | None:
        return self.driver.get_cookie(name)

    # --- finding and waiting --------------------------------------------------------------------------------------

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait(self, condition: Callable[[WebDriver], Any], message: str, timeout: float = WAIT_SECONDS) -> Any:
        """Wait until ``condition(driver)`` is truthy (exceptions count as not yet); returns its value."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05, ignored_exceptions=PAGE_CHANGING).until(
                condition
            )
        except TimeoutException:
            raise AssertionError(f"{self.name}: waited {timeout}s for {message}; now at {self.path}") from None

    def wait_for(self, css: str, timeout: float = WAIT_SECONDS) -> WebElement:
        """The first element matching ``css``, once one is there."""
        found = self.wait(lambda driver: driver.find_elements(By.CSS_SELECTOR, css), f"{css!r}", timeout)
        return found[0]

    def wait_for_path(self, check: Callable[[str], bool] | str, timeout: float = WAIT_SECONDS) -> str:
        """Wait for a page whose path equals ``check`` (or for which ``check(path)`` is true)."""
        test = check if callable(check) else (lambda path: path == check)
        self.wait(lambda _: test(self.path), f"the path to be {check!r}", timeout)
        return self.path

    def text(self, css: str) -> str | None:
        """The textContent of the first match with whitespace runs made one space; None if there is none."""
        return self.driver.execute_script(
            "const e = document.querySelector(arguments[0]);"
            "return e ? e.textContent.replace(/\\s+/g, ' ').trim() : null;",
            css,
        )

    def attribute(self, css: str, name: str) -> str | None:
        return self.driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;",
            css,
            name,
        )

    def watch_text(self, css: str, until: Callable[[str], bool], timeout: float = WAIT_SECONDS) -> list[str]:
        """Poll the text of ``css`` (see ``text``) until ``until(text)``; returns every distinct text seen,
        in order (so a test can tell a reply that grew word by word from one that appeared whole)."""
        seen: list[str] = []

        def step(_: WebDriver) -> bool:
            text = self.text(css)
            if text is not None and (not seen or seen[-1] != text):
                seen.append(text)
            return text is not None and until(text)

        try:
            WebDriverWait(self.driver, timeout, poll_frequency=0.02, ignored_exceptions=PAGE_CHANGING).until(step)
        except TimeoutException:
            raise AssertionError(f"{self.name}: waited {timeout}s on {css!r}; saw {seen}") from None
        return seen

    def console_errors(self) -> list[str]:
        """Uncaught script errors logged since the last call (network failures are left out)."""
        entries = self.driver.get_log("browser")
        return [entry["message"] for entry in entries if entry["level"] == "SEVERE" and "Uncaught" in entry["message"]]

    # --- pictures -------------------------------------------------------------------------------------------------

    def screenshot(self, name: str, *, readme: bool = False) -> Path:
        """Save the viewport as ``<artifacts>/<name>.png``; ``readme``: also as the README's picture, when
        UPDATE_README_SCREENSHOTS=1 (a test run never rewrites a tracked file unasked)."""
        path = self.artifacts / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), f"no screenshot of {self.path}"
        if readme and os.environ.get("UPDATE_README_SCREENSHOTS") == "1":
            README_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, README_SCREENSHOTS / f"{name}.png")
        return path

    def save_failure(self, test_name: str) -> None:
        """Keep what the browser showed when a test failed: screenshot, HTML and console."""
        stem = self.artifacts / f"FAILED-{test_name}-{self.name}"
        try:
            self.driver.save_screenshot(f"{stem}.png")
            Path(f"{stem}.html").write_text(self.driver.page_source)
            console = "\n".join(f"{e['level']} {e['message']}" for e in self.driver.get_log("browser"))
            Path(f"{stem}.console.txt").write_text(f"{self.driver.current_url}\n{console}\n")
        except Exception as exc:  # noqa: BLE001 - the test's own failure is the one to report
            Path(f"{stem}.error.txt").write_text(repr(exc))


# --- the chat page (/chats/<id>), as the contract lays it out -------------------------------------------------------


def message_css(message_id: str) -> str:
    """The selector of one message's article."""
    return f'#messages article.message[data-message-id="{message_id}"]'


def chat_open(browser: Browser, chat_id: str) -> None:
    """Open a chat's page and wait for its live stream to be connected."""
    browser.open(f"/chats/{chat_id}")
    browser.wait(lambda _: browser.attribute("#connection", "data-state") == "open", "the stream to open")


def chat_messages(browser: Browser) -> list[str]:
    """The ids of the messages shown, top to bottom."""
    return [article.get_attribute("data-message-id") for article in browser.find_all("#messages article.message")]


def prompt_send(browser: Browser, prompt: str, *, click: bool = False) -> str:
    """Type a prompt and send it (Enter, or the send button); returns the id of the message it made."""
    before = len(chat_messages(browser))
    box = browser.find("#prompt")
    box.send_keys(prompt)
    if click:
        browser.find("#send").click()
    else:
        box.send_keys(Keys.ENTER)
    browser.wait(lambda _: len(chat_messages(browser)) == before + 1, f"the message of {prompt!r} to appear")
    return chat_messages(browser)[-1]


def prompt_newline(browser: Browser) -> None:
    """Shift+Enter in the prompt box."""
    ActionChains(browser.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()


def message_status_wait(browser: Browser, message_id: str, status: str) -> None:
    """Wait for a message's article to show this status (streaming, complete or error)."""
    browser.wait(
        lambda _: browser.attribute(message_css(message_id), "data-status") == status,
        f"message {message_id} to be {status}",
    )


def assert_only_grew(seen: list[str], final: str) -> None:
    """Each text shown was the start of the next (no word lost, none repeated), and the last is ``final``."""
    shown = [text for text in seen if text]
    for earlier, later in zip(shown, shown[1:], strict=False):
        assert later.startswith(earlier), f"the reply went back or repeated: {earlier!r} then {later!r}"
    assert shown and shown[-1] == final, f"the reply ended as {seen[-1:]}, not {final!r}"


def assert_grew_word_by_word(seen: list[str], final: str) -> None:
    """As assert_only_grew, and shown in at least two states between empty and whole: it streamed."""
    assert_only_grew(seen, final)
    intermediate = [text for text in seen if text and text != final]
    assert len(intermediate) >= 2, f"the reply did not stream: saw {seen}"


# --- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $BROWSER_ARTIFACTS, or a pytest temporary folder."""
    folder = os.environ.get("BROWSER_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("browser")
    path.mkdir(parents=True, exist_ok=True)
    return path


class _BrowserPool:
    """The chromium processes of one test module, started when first asked for."""

    def __init__(self, base_url: str, artifacts: Path) -> None:
        self.base_url = base_url
        self.artifacts = artifacts
        self.browsers: list[Browser] = []

    def get(self, index: int) -> Browser:
        while len(self.browsers) <= index:
            name = f"browser{len(self.browsers) + 1}"
            self.browsers.append(Browser(browser_start(), self.base_url, self.artifacts, name))
        browser = self.browsers[index]
        browser.reset()
        return browser

    def close(self) -> None:
        for browser in self.browsers:
            browser.driver.quit()


@pytest.fixture(scope="module")
def browser_pool(turbo_server: Any, browser_artifacts: Path) -> Iterator[_BrowserPool]:
    pool = _BrowserPool(turbo_server.url, browser_artifacts)
    yield pool
    pool.close()


_call_failed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.stash[_call_failed] = report.failed
    return report


def _browser_fixture(request: pytest.FixtureRequest, pool: _BrowserPool, index: int) -> Iterator[Browser]:
    browser = pool.get(index)
    yield browser
    if request.node.stash.get(_call_failed, False):
        browser.save_failure(request.node.name)
    browser.driver.get("about:blank")  # leave no page, so no WebSocket, behind


@pytest.fixture
def browser(request: pytest.FixtureRequest, browser_pool: _BrowserPool) -> Iterator[Browser]:
    """A clean chromium on the live server."""
    yield from _browser_fixture(request, browser_pool, 0)


@pytest.fixture
def second_browser(request: pytest.FixtureRequest, browser_pool: _BrowserPool) -> Iterator[Browser]:
    """Another clean chromium (its own cookies: a second user)."""
    yield from _browser_fixture(request, browser_pool, 1)
