"""The web app's group pages in a real browser, with two users in two browsers: a group chat streams live to both,
and an owner manages the members. `make browser-deps` installs chromium and chromedriver."""

import re

import pytest
from selenium.webdriver.support.ui import Select

from testing.browser import (
    Browser,
    assert_grew_word_by_word,
    chat_messages,
    chat_open,
    message_css,
    message_status_wait,
    prompt_send,
)

pytest_plugins = ["testing.browser"]
pytestmark = pytest.mark.django_db(transaction=True)


def group_create(browser: Browser, name: str) -> str:
    """Make a group with the index page's form; returns its id (the page it lands on)."""
    browser.open("/")
    browser.find("#group-create-form [name=name]").send_keys(name)
    browser.find("#group-create-submit").click()
    path = browser.wait_for_path(lambda path: re.fullmatch(r"/groups/[0-9a-f-]{36}", path) is not None)
    assert browser.text("#group-title") == name
    return path.removeprefix("/groups/")


def member_add(browser: Browser, username: str) -> None:
    """As the owner on the group's page: add a member by username."""
    field = browser.find("#member-add-form [name=username]")
    field.clear()  # after an error the form shows what was typed
    field.send_keys(username)
    browser.find("#member-add-submit").click()


def member_css(username: str) -> str:
    return f'#members li.member[data-username="{username}"]'


def members(browser: Browser) -> list[str]:
    return [item.get_attribute("data-username") for item in browser.find_all("#members li.member")]


def group_links(browser: Browser) -> list[str]:
    browser.open("/")
    browser.wait_for("#main")
    return [link.get_attribute("href").removeprefix(browser.base_url) for link in browser.find_all("a.group-link")]


def test_two_members_see_each_others_prompts_and_the_reply_live(browser, second_browser, signup, upstream):
    ada_token, _, _ = signup("ada")
    grace_token, _, _ = signup("grace")
    ada, grace = browser, second_browser
    ada.sign_in(ada_token)
    grace.sign_in(grace_token)

    group_id = group_create(ada, "Design team")
    member_add(ada, "grace")
    ada.wait_for(member_css("grace"))

    # Ada opens a chat in the group with the index page's form.
    ada.open("/")
    ada.find("#chat-create-form [name=name]").send_keys("Launch plan")
    Select(ada.find("#chat-create-form select[name=group_id]")).select_by_value(group_id)
    ada.find("#chat-create-submit").click()
    chat_path = ada.wait_for_path(lambda path: re.fullmatch(r"/chats/[0-9a-f-]{36}", path) is not None)
    chat_id = chat_path.removeprefix("/chats/")
    ada.wait(lambda _: ada.attribute("#connection", "data-state") == "open", "ada's stream to open")

    # Grace finds it on her index (a chat of her group) and opens it.
    grace.open("/")
    grace.wait_for(f'a.chat-link[href="{chat_path}"]').click()
    grace.wait_for_path(chat_path)
    grace.wait(lambda _: grace.attribute("#connection", "data-state") == "open", "grace's stream to open")

    words = "we ship on friday after the demo and before the retro"
    message_id = prompt_send(ada, f"[chunk_delay:0.15] echo: {words}")
    grace.wait_for(message_css(message_id))
    author = f"{message_css(message_id)} .prompt .author"
    grace.wait(lambda _: grace.text(author) == "ada", "ada's name on her prompt")
    assert words in grace.text(f"{message_css(message_id)} .prompt")
    seen = grace.watch_text(f"{message_css(message_id)} .reply", lambda text: text == words)
    assert_grew_word_by_word(seen, words)
    message_status_wait(grace, message_id, "complete")
    message_status_wait(ada, message_id, "complete")
    assert ada.text(f"{message_css(message_id)} .reply") == words

    # And the other way round.
    words = "sounds good to me and see you there"
    answer = prompt_send(grace, f"[chunk_delay:0.15] echo: {words}")
    ada.wait_for(message_css(answer))
    author = f"{message_css(answer)} .prompt .author"
    ada.wait(lambda _: ada.text(author) == "grace", "grace's name on her prompt")
    seen = ada.watch_text(f"{message_css(answer)} .reply", lambda text: text == words)
    assert_grew_word_by_word(seen, words)
    message_status_wait(ada, answer, "complete")
    message_status_wait(grace, answer, "complete")
    assert chat_messages(ada) == chat_messages(grace) == [message_id, answer]
    ada.screenshot("group-chat")

    # The group page lists both members and the chat.
    ada.open(f"/groups/{group_id}")
    assert sorted(members(ada)) == ["ada", "grace"]
    assert ada.find_all(f'a.chat-link[href="{chat_path}"]')
    ada.screenshot("group", readme=True)

    chat_open(grace, chat_id)  # the page, loaded afresh, shows the same conversation
    assert chat_messages(grace) == [message_id, answer]


def test_the_owner_adds_and_removes_members_and_a_member_leaves(browser, second_browser, signup):
    owner_token, _, _ = signup()
    member_token, member, _ = signup()
    owner, guest = browser, second_browser
    owner.sign_in(owner_token)
    guest.sign_in(member_token)
    name = member["username"]

    group_id = group_create(owner, "Book club")
    group_path = f"/groups/{group_id}"
    assert group_path not in group_links(guest)

    # An unknown username is an error on the form; nobody is added.
    member_add(owner, "nobody-by-this-name")
    error = owner.wait_for(".form-error[role=alert]")
    assert error.is_displayed() and error.text.strip()
    assert len(members(owner)) == 1

    member_add(owner, name)
    owner.wait_for(member_css(name))
    assert owner.find_all(f"{member_css(name)} .remove-member"), "no remove button for the new member"
    assert len(owner.find_all(".remove-member")) == 1, "the owner may not be removed"

    # The owner renames the group.
    rename = owner.find("#group-rename-form [name=name]")
    rename.clear()
    rename.send_keys("Reading club")
    owner.find("#group-rename-submit").click()
    owner.wait(lambda _: owner.text("#group-title") == "Reading club", "the new name")

    # The member sees the group, as a member: no owner's forms, a leave button.
    assert group_path in group_links(guest)
    guest.open(group_path)
    assert guest.text("#group-title") == "Reading club"
    assert sorted(members(guest)) == sorted(members(owner))
    assert not guest.find_all("#member-add-form") and not guest.find_all(".remove-member")
    assert not guest.find_all("#group-rename-form")
    assert guest.find_all("#leave-form #leave")
    assert not owner.find_all("#leave-form"), "the owner is offered to leave"

    # The owner removes them: the group is gone for them.
    owner.find(f"{member_css(name)} .remove-member").click()
    owner.wait(lambda _: name not in members(owner), "the member to be removed")
    guest.open(group_path)
    assert guest.navigation_status() == 404
    assert not guest.find_all("#group-title")
    guest.screenshot("group-not-found")
    assert group_path not in group_links(guest)

    # Added again, they leave by themselves.
    member_add(owner, name)
    owner.wait_for(member_css(name))
    guest.open(group_path)
    guest.find("#leave").click()
    guest.wait_for_path("/")
    assert group_path not in group_links(guest)
    owner.open(group_path)
    assert name not in members(owner)
    owner.screenshot("group-owner")
