"""The chat page of docs/clients.md, as written, in two Chromium pages against a real server."""

from __future__ import annotations

import re

import trio

from .conftest import REPO, Chromium, open_page, running_server

DOC = REPO / "docs" / "clients.md"


def chat_page() -> str:
    found = re.search(r"```html\n<!-- file: chat\.html -->\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert found, "docs/clients.md has no chat.html example"
    return found.group(1)


async def test_the_chat_page_example_works_in_two_browsers(chromium: Chromium) -> None:
    with trio.fail_after(30):
        async with running_server() as server:
            html = chat_page().replace("127.0.0.1:8765", f"127.0.0.1:{server.port}")
            async with open_page(chromium, "", html) as ann, open_page(chromium, "", html) as bob:
                for page in (ann, bob):
                    await page.wait("document.getElementById('status').textContent === 'connected'")
                    assert await page.eval("document.getElementById('status').className") == "connected"
                    assert await page.text("#transport") == "via websocket"

                def say(text: str) -> str:
                    return (f"document.getElementById('text').value = {text!r};"
                            "document.getElementById('send').requestSubmit()")

                await ann.eval(say("hello bob"))
                await bob.eval(say("hi ann"))
                for page in (ann, bob):
                    await page.wait("document.querySelectorAll('#messages li').length === 2")
                lines = [await page.eval("[...document.querySelectorAll('#messages li')].map((li) => li.textContent)")
                         for page in (ann, bob)]
    assert lines[0] == lines[1]
    assert [line.split(": ", 1)[1] for line in lines[0]] == ["hello bob", "hi ann"]
    assert all(re.fullmatch(r"guest-\d+: .+", line) for line in lines[0])
