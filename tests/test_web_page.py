"""The chat page in a real browser: Debian's headless Chromium, driven by selenium, against a real
`minillama serve` process. The page streams a reply, and its toggles show what the API hides: the tokens shaded
by probability with their alternatives on hover, the rendered prompt, its token ids, the request and the stream.

Set MINILLAMA_SCREENSHOT=docs/chat-page.png to write the screenshot of the page that docs/ shows."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest

from serving import start_server

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="no Chromium: apt-get install chromium chromium-driver (.ci/run does)")

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

MAX_TOKENS = 12  # the tiny random model rarely stops by itself: every reply runs to this limit
WAIT = 60  # seconds for anything the page does; a reply of 12 tokens from the tiny model takes well under one


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with a fresh profile and nothing that phones home (CI runs as root: --no-sandbox)."""
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def by_testid(name: str) -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{name}"]'


def wait_for(driver, condition, timeout: float = WAIT):
    return WebDriverWait(driver, timeout).until(condition)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(driver, lambda d: d.find_element(*by_testid("model-info")).text != "connecting…")


def set_max_tokens(driver, n: int) -> None:
    settings = driver.find_element(*by_testid("settings"))
    if settings.get_attribute("open") is None:
        settings.find_element(By.TAG_NAME, "summary").click()
    field = driver.find_element(*by_testid("max-tokens"))
    field.clear()
    field.send_keys(str(n))


def send_message(driver, text: str) -> None:
    driver.find_element(*by_testid("user-input")).send_keys(text)
    driver.find_element(*by_testid("send")).click()


def wait_for_reply(driver, count: int):
    """The count-th reply, once its stream has ended (the stats line then carries the completion's token count)."""
    def finished(d):
        replies = d.find_elements(*by_testid("reply"))
        if len(replies) < count:
            return False
        stats = replies[count - 1].find_element(*by_testid("reply-stats"))
        return replies[count - 1] if stats.get_attribute("data-completion-tokens") else False

    try:
        return wait_for(driver, finished)
    except TimeoutException as timeout:
        error = driver.find_element(*by_testid("error")).text
        raise AssertionError(f"no finished reply {count}; the page's error box says: {error!r}") from timeout


def open_toggle(reply, name: str):
    toggle = reply.find_element(*by_testid(name))
    if toggle.get_attribute("open") is None:
        toggle.find_element(By.TAG_NAME, "summary").click()
    return toggle


def context_used(stats_text: str) -> tuple[int, int]:
    match = re.search(r"context: (\d+)/(\d+)", stats_text)
    assert match, stats_text
    return int(match[1]), int(match[2])


def test_chat_page_streams_a_reply_and_shows_its_tokens(chat_model, browser, tmp_path):
    with start_server(chat_model, "--slots", "2", tmp_path=tmp_path) as server:
        max_model_len = httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"]
        open_page(browser, server.url)
        set_max_tokens(browser, MAX_TOKENS)
        send_message(browser, "Hello there")
        reply = wait_for_reply(browser, 1)

        stats = reply.find_element(*by_testid("reply-stats"))
        completion_tokens = int(stats.get_attribute("data-completion-tokens"))
        assert 1 <= completion_tokens <= MAX_TOKENS
        if "finish: length" in stats.text:
            assert completion_tokens == MAX_TOKENS
        assert "tok/s" in stats.text or completion_tokens == 1, stats.text
        assert reply.find_element(*by_testid("reply-content")).get_attribute("textContent")

        # One shaded token per generated token, each with its probability as its colour.
        open_toggle(reply, "toggle-tokens")
        tokens = reply.find_elements(*by_testid("token"))
        assert len(tokens) == completion_tokens
        for token in tokens:
            assert 0 < float(token.get_attribute("data-prob")) <= 1
            assert "hsl" in token.get_attribute("style") or "rgb" in token.get_attribute("style")

        # Hovering a token shows the top_logprobs=5 alternatives it was sampled among, each with a percentage.
        tooltip = browser.find_element(*by_testid("tooltip"))
        assert not tooltip.is_displayed()
        ActionChains(browser).move_to_element(tokens[len(tokens) // 2]).perform()
        wait_for(browser, EC.visibility_of(tooltip))
        alternatives = tooltip.find_elements(*by_testid("tooltip-alt"))
        assert len(alternatives) == 5
        assert all(re.search(r"\d%$", alt.text) for alt in alternatives), tooltip.text

        # The prompt as the template rendered it, and its token ids: the context line is prompt + reply tokens.
        prompt_view = open_toggle(reply, "toggle-prompt").find_element(*by_testid("prompt-text"))
        prompt = prompt_view.get_attribute("textContent")
        assert "<|start_header_id|>user<|end_header_id|>" in prompt and "Hello there" in prompt
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        prompt_tokens = open_toggle(reply, "toggle-prompt-tokens").find_elements(*by_testid("prompt-token"))
        assert prompt_tokens and prompt_tokens[0].text.split() == ["<|begin_of_text|>", "128000"]
        used, total = context_used(stats.text)
        assert (used, total) == (len(prompt_tokens) + completion_tokens, max_model_len)

        # The wire: the JSON sent, and the stream's lines as they came, to the end.
        wire = open_toggle(reply, "toggle-wire")
        request = wire.find_element(*by_testid("request-json")).get_attribute("textContent")
        assert '"stream": true' in request and '"top_logprobs": 5' in request
        assert f'"max_tokens": {MAX_TOKENS}' in request and '"seed"' not in request  # empty seed: none sent
        stream = wire.find_element(*by_testid("stream-lines")).get_attribute("textContent")
        assert stream.rstrip().endswith("data: [DONE]") and '"usage"' in stream

        if os.environ.get("MINILLAMA_SCREENSHOT"):
            ActionChains(browser).move_to_element(tokens[len(tokens) // 2]).perform()
            browser.save_screenshot(os.environ["MINILLAMA_SCREENSHOT"])

        # The history goes back with the next turn: the second prompt holds the first reply (which Llama 3's
        # template trims of leading and trailing whitespace).
        first_reply = reply.find_element(*by_testid("reply-content")).get_attribute("textContent")
        send_message(browser, "And again")
        second = wait_for_reply(browser, 2)
        second_prompt = open_toggle(second, "toggle-prompt").find_element(*by_testid("prompt-text"))
        assert first_reply.strip() in second_prompt.get_attribute("textContent")

        # New chat empties the conversation.
        browser.find_element(*by_testid("new-chat")).click()
        assert browser.find_elements(*by_testid("reply")) == []

        # A refused request shows the server's error message, and the text goes back in the box to retry.
        temperature = browser.find_element(*by_testid("temperature"))
        temperature.clear()
        temperature.send_keys("5")
        send_message(browser, "Too hot")
        wait_for(browser, lambda d: "temperature" in d.find_element(*by_testid("error")).text)
        assert browser.find_element(*by_testid("user-input")).get_attribute("value") == "Too hot"
        assert browser.find_elements(*by_testid("reply")) == []


def test_chat_page_asks_for_the_api_key_once(chat_model, browser, tmp_path):
    with start_server(chat_model, "--api-key", "secret", tmp_path=tmp_path) as server:
        browser.get(server.url)  # the page itself is open; the API behind it is not
        key_form = browser.find_element(*by_testid("key-form"))
        wait_for(browser, EC.visibility_of(key_form))

        # A wrong key is refused and asked for again; the right one lets the page load the model.
        browser.find_element(*by_testid("api-key")).send_keys("wrong")
        browser.find_element(*by_testid("api-key-submit")).click()
        wait_for(browser, lambda d: "refused" in d.find_element(*by_testid("error")).text)
        assert key_form.is_displayed()
        browser.find_element(*by_testid("api-key")).send_keys("secret")
        browser.find_element(*by_testid("api-key-submit")).click()
        wait_for(browser, lambda d: d.find_element(*by_testid("model-info")).text not in ("connecting…", "no model"))
        assert not key_form.is_displayed()

        set_max_tokens(browser, 4)
        send_message(browser, "Hi")
        reply = wait_for_reply(browser, 1)
        assert reply.find_element(*by_testid("reply-content")).get_attribute("textContent")
        assert not key_form.is_displayed()
        # Kept for this tab's session only, and never shown: the wire view masks it.
        assert browser.execute_script("return sessionStorage.getItem('minillama-api-key')") == "secret"
        assert browser.execute_script("return localStorage.length") == 0
        wire = open_toggle(reply, "toggle-wire")
        request = wire.find_element(*by_testid("request-json")).get_attribute("textContent")
        assert "Authorization: Bearer ••••••" in request and "secret" not in browser.page_source

        # Stop mid-reply: the page keeps what came and is ready for the next message.
        set_max_tokens(browser, 1500)
        send_message(browser, "Go on")
        wait_for(browser, lambda d: len(d.find_elements(*by_testid("reply"))) == 2
                 and d.find_elements(*by_testid("reply"))[1].find_elements(*by_testid("token")))
        browser.find_element(*by_testid("stop")).click()
        second = browser.find_elements(*by_testid("reply"))[1]
        wait_for(browser, lambda d: second.find_element(*by_testid("reply-stats")).text == "stopped")
        assert browser.find_element(*by_testid("send")).is_displayed()
        assert len(second.find_elements(*by_testid("token"))) < 1500
