"""The chat page at / in headless Chromium (Debian's, driven by Playwright): key prompt, streaming, stop, new chat.

CI installs /usr/bin/chromium (.ci/run) and these tests fail there without it; elsewhere they skip.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_serve import API_KEY, MODEL, Server, tiny_lm

from sparkgpt import Tokenizer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser() -> None:
    missing = None
    if not CHROMIUM.exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            missing = "playwright (Python) is not installed"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the web page tests need a browser in CI: {missing}")
        pytest.skip(missing)


@pytest.fixture(scope="module")
def web_server(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_browser()
    # A long context, so that a reply can run long enough to be stopped by a click.
    checkpoint = tiny_lm(tokenizer, max_seq_len=4096).save(tmp_path_factory.mktemp("web") / "tiny-long")
    server = Server(checkpoint, "--api-key", API_KEY, "--model-name", MODEL, "--max-concurrency", "2",
                    log=tmp_path_factory.mktemp("logs") / "web.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def page(web_server: Server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(web_server.url + "/")
            yield page
        finally:
            browser.close()


def test_page_asks_for_the_key_then_streams_a_reply(page, web_server: Server):
    # The server wants a key: the page says so and offers a field for it.
    key_panel = page.locator("#key-panel")
    key_panel.wait_for(state="visible")
    page.fill("#api-key", "sk-wrong")
    page.click("#save-key")
    page.wait_for_function("document.getElementById('key-message').textContent.includes('not accepted')")
    page.fill("#api-key", API_KEY)
    page.click("#save-key")
    page.wait_for_function(f"document.getElementById('model-name').textContent === {MODEL!r}")
    assert key_panel.is_hidden()

    page.click("#toggle-settings")
    page.fill("#system-prompt", "You are terse.")
    page.fill("#max-tokens", "24")
    page.locator("#temperature").fill("0")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    reply = page.locator(".message.assistant").last
    page.wait_for_function("document.querySelector('.message.assistant:last-child').dataset.state === 'done'")
    assert page.locator(".message.user").last.text_content() == "Hello there"
    # The page sent the system prompt, temperature and max tokens: its reply is the API's reply to the same.
    expected = web_server.client().chat.completions.create(
        model=MODEL, temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}],
    ).choices[0].message.content
    assert reply.text_content() == expected


def test_stop_button_ends_a_streaming_reply_and_frees_the_slot(page, web_server: Server):
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    page.fill("#max-tokens", "3500")
    page.locator("#temperature").fill("0")
    page.fill("#input", "Tell me a very long story")
    page.click("#send")
    # Text appears while the reply is still streaming...
    page.wait_for_function("""() => {
        const reply = document.querySelector('.message.assistant:last-child');
        return reply && reply.dataset.state === 'streaming' && reply.textContent.length > 5;
    }""")
    assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
    page.click("#stop")
    reply = page.locator(".message.assistant").last
    page.wait_for_function("document.querySelector('.message.assistant:last-child').dataset.state === 'stopped'")
    stopped_text = reply.text_content()
    assert stopped_text.endswith("[stopped]")
    time.sleep(0.3)
    assert reply.text_content() == stopped_text  # nothing more arrives
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    # The server saw the disconnect: the sequence was aborted and its slot freed.
    deadline = time.monotonic() + 15
    while web_server.metric("sparkgpt_active_sequences") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert web_server.metric("sparkgpt_active_sequences") == 0
    assert web_server.metric("sparkgpt_requests_aborted_total") >= 1


def test_code_blocks_render_as_code(page):
    html = page.evaluate("renderMarkdown('Use `x`:\\n```python\\nprint(\"<b>\")\\n```\\nDone.')")
    assert html == ('Use <code>x</code>:<pre><span class="lang">python</span><code class="language-python">'
                    'print(&quot;&lt;b&gt;&quot;)</code></pre>Done.')
    unclosed = page.evaluate("renderMarkdown('```js\\nlet a = 1;')")  # mid-stream: still a code block
    assert "<pre>" in unclosed and "let a = 1;" in unclosed
