"""The chat page at ``/`` in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
Selenium against a live server. A message sent from the page gets its reply streamed into the page, reasoning and
answer apart; the second turn sends the first as history; the system prompt and the think toggle reach the server;
the stop button ends a reply that would never end. Every wait is for something the page shows (WebDriverWait), never
a sleep. A screenshot of the page is kept in ``test-artifacts/chat_page.png``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="pip install selenium (the dev extra) for the browser test")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.test_serve import THINK_TASK, save_tiny_checkpoint, scripted_generate, serve  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER),
        reason="no headless Chromium: apt-get install chromium chromium-driver (.ci/run installs them)",
    ),
]
REPLY = "<think>\n先想一想\n</think>\n\n答案是好"


@pytest.fixture(scope="module")
def think_ckpt(tmp_path_factory, small_tokenizer) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("page") / "run", small_tokenizer, task=THINK_TASK)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def _send(browser, text: str) -> None:
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def _replies(browser) -> list:
    return browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")


def _wait(browser, condition, timeout: float = 60):
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda _: condition())


def test_a_message_sent_from_the_page_gets_its_reply_streamed_with_history(think_ckpt, small_tokenizer, browser):
    seen: list = []
    server = serve(think_ckpt, generate_fn=scripted_generate(small_tokenizer, REPLY, seen), window_s=0.0)
    try:
        browser.get(server.url + "/")
        _wait(browser, lambda: "tiny" in browser.find_element(By.ID, "model").text)  # /v1/models answered
        browser.find_element(By.ID, "system").send_keys("你是医生。")
        _send(browser, "你好")
        _wait(browser, lambda: _replies(browser) and _replies(browser)[-1].find_element(By.CLASS_NAME, "content").text)
        _wait(browser, lambda: browser.find_element(By.ID, "send").is_enabled())  # the stream ended
        reply = _replies(browser)[-1]
        assert reply.find_element(By.CLASS_NAME, "content").text == "答案是好"
        assert reply.find_element(By.CLASS_NAME, "reasoning").text == "先想一想"
        assert "你是医生。" in small_tokenizer.decode(seen[-1])  # the page's system prompt reached the model

        browser.find_element(By.ID, "think").click()  # thinking off for the next turn
        _send(browser, "再说一遍")
        _wait(browser, lambda: len(_replies(browser)) == 2 and browser.find_element(By.ID, "send").is_enabled())
        second = small_tokenizer.decode(seen[-1])
        assert "你好" in second and "答案是好" in second and "再说一遍" in second  # the first turn as history
        assert second.endswith(THINK_TASK["think_off_prefix"])  # the toggle switched thinking off
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "chat_page.png"))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def long_ckpt(tmp_path_factory, small_tokenizer) -> Path:
    """A context of 8,192: room for a reply of 8,000 tokens, which the stop button cuts long before its end."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("page_long") / "run", small_tokenizer, max_seq_len=8192)


def test_the_stop_button_ends_a_reply_that_would_never_end(long_ckpt, small_tokenizer, browser):
    server = serve(long_ckpt, generate_fn=scripted_generate(small_tokenizer, "好", [], forever=True), window_s=0.0)
    try:
        browser.get(server.url + "/")
        _wait(browser, lambda: "tiny" in browser.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "max_tokens").send_keys("8000")  # 8,000 tokens at 5 ms each: 40 s to stop it
        _send(browser, "一直说")
        _wait(browser, lambda: _replies(browser) and _replies(browser)[-1].find_element(By.CLASS_NAME, "content").text)
        browser.find_element(By.ID, "stop").click()
        _wait(browser, lambda: _replies(browser)[-1].find_element(By.CLASS_NAME, "meta").text == "(stopped)")
        _wait(browser, lambda: server.get("/stats").get("cancelled_rows", 0) >= 1)  # the server stopped the row too
        assert browser.find_element(By.ID, "send").is_enabled()
    finally:
        server.stop()
