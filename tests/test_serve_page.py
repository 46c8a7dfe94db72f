"""The chat page of ``fusionlm serve`` in a real (headless) Chromium, against a live server on 127.0.0.1.

A picture attached through the file input and a question typed in give, streamed into the page, the
answer the server gives to the same request unstreamed; a request the server refuses shows its
message as an error. The browser is kept to loopback: every other host name fails to resolve and no
proxy, sync or update traffic is allowed.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import time
import urllib.request

import pytest

from fusionlm.serve.state import ServeSettings
from serve_live import CHROMEDRIVER, CHROMIUM, Server, chromium

QUESTION = "Which colour does the shape have?"
MAX_TOKENS = 64  # the page's default


@pytest.fixture(scope="module", autouse=True)
def browser_available():
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium is not installed")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} missing (apt install chromium chromium-driver)")


def chat(server, body: dict) -> bytes:
    """The raw body the server answers ``body`` with."""
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


@pytest.fixture(scope="module")
def server(checkpoint):
    live = Server(ServeSettings(checkpoint=str(checkpoint), model_name="tiny", slots=2, max_queue=4))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def driver():
    browser = chromium()
    try:
        yield browser
    finally:
        browser.quit()


def wait(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def find(driver, css: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def text_of(driver, element) -> str:
    """The exact text (``.text`` would fold its whitespace)."""
    return driver.execute_script("return arguments[0].textContent", element)


def open_page(driver, server):
    driver.get(server.url + "/")
    wait(driver, lambda d: text_of(d, find(d, "#model")[0]) == "tiny")


def events(raw: bytes) -> list[dict]:
    lines = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_a_picture_and_a_question_get_the_servers_answer_streamed(server, driver, world, tmp_path):
    picture = tmp_path / "scene.png"
    world.sample("color", "test", 0).images[0].save(picture)
    url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()  # what FileReader makes
    request = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": QUESTION}]}],
               "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = json.loads(chat(server, request))
    expected = whole["choices"][0]["message"]["content"]
    streamed = events(chat(server, {**request, "stream": True, "stream_options": {"include_usage": True}}))
    pieces = [e["choices"][0]["delta"].get("content") for e in streamed if e["choices"]]
    pieces = [p for p in pieces if p]
    assert expected and "".join(pieces) == expected and len(pieces) > 1

    open_page(driver, server)
    for _ in range(2):  # attached twice, then once removed
        find(driver, "#attach")[0].send_keys(str(picture))
    wait(driver, lambda d: len(find(d, "#thumbs .thumb img")) == 2)
    find(driver, "#thumbs .thumb .remove")[0].click()
    wait(driver, lambda d: [i.get_attribute("src") for i in find(d, "#thumbs .thumb img")] == [url])
    find(driver, "#prompt")[0].send_keys(QUESTION)
    started = time.monotonic()
    find(driver, "#send")[0].click()
    answer = wait(driver, lambda d: (find(d, '.assistant[data-done="1"]') or [None])[0])
    took = time.monotonic() - started

    assert text_of(driver, find(driver, ".assistant .text")[0]) == expected
    assert answer.get_attribute("data-chunks") == str(len(pieces))  # each delta was written as it came
    use = whole["usage"]
    assert text_of(driver, find(driver, ".assistant .usage")[0]) == (
        f"prompt {use['prompt_tokens']} · completion {use['completion_tokens']} · image 16 tokens")
    (user,) = find(driver, ".user")
    assert text_of(driver, find(driver, ".user .text")[0]) == QUESTION
    assert [i.get_attribute("src") for i in find(driver, ".user img")] == [url]
    assert not find(driver, ".error") and not find(driver, "#thumbs .thumb")
    assert find(driver, "#prompt")[0].get_attribute("value") == "" and find(driver, "#send")[0].text == "Send"
    assert took < 15

    find(driver, "#new-chat")[0].click()
    assert not find(driver, "#messages > *")


def test_a_refused_request_shows_the_servers_message(server, driver):
    from selenium.webdriver.common.keys import Keys

    open_page(driver, server)
    tokens = find(driver, "#max-tokens")[0]
    assert tokens.get_attribute("value") == "64" and find(driver, "#temperature")[0].get_attribute("value") == "0"
    tokens.clear()
    tokens.send_keys("100000")
    find(driver, "#prompt")[0].send_keys("Hello?", Keys.ENTER)  # Enter sends
    (error,) = wait(driver, lambda d: find(d, ".bubble.error"))
    assert "max_tokens" in text_of(driver, error) and "context" in text_of(driver, error)
    assert not find(driver, ".assistant")  # the empty answer bubble made way for the error
    assert "failed" in find(driver, ".user")[0].get_attribute("class")


def test_an_api_key_is_kept_and_sent_as_a_bearer_token(server, driver):
    open_page(driver, server)
    key = find(driver, "#api-key")[0]
    key.send_keys("sesame\t")  # leaving the field stores it
    wait(driver, lambda d: d.execute_script("return localStorage.getItem('fusionlm.apiKey')") == "sesame")
    open_page(driver, server)
    assert find(driver, "#api-key")[0].get_attribute("value") == "sesame"
    assert driver.execute_script("return headers()")["Authorization"] == "Bearer sesame"
    find(driver, "#api-key")[0].clear()
    find(driver, "#api-key")[0].send_keys("\t")
    wait(driver, lambda d: d.execute_script("return localStorage.getItem('fusionlm.apiKey')") is None)
    assert "Authorization" not in driver.execute_script("return headers()")


def test_answers_draw_only_data_image_pictures_and_never_markup(server, driver):
    open_page(driver, server)
    dot = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really").decode()
    text = (f"see ![a dot]({dot}) and ![x](javascript:alert(1)) ![y](data:text/html;base64,PHA+) "
            "<img src=x onerror=window.pwned=1><b>bold</b>")
    node = driver.execute_script("const n = document.createElement('div'); render(n, arguments[0]);"
                                 "document.body.append(n); return n", text)
    imgs = driver.execute_script("return [...arguments[0].querySelectorAll('*')].map(e => [e.tagName, e.src])", node)
    assert imgs == [["IMG", dot]]
    assert text_of(driver, node) == text.replace(f"![a dot]({dot})", "")
    assert driver.execute_script("return window.pwned") is None
