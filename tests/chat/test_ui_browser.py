"""End to end in a real browser: `llamaft chat RUN --ui` served on a free loopback port, driven by
headless Chromium through Selenium (Debian's chromium + chromium-driver; nothing downloaded).

Checks: the page loads with nothing fetched from outside 127.0.0.1; a message gets a streamed reply
equal to stream_chat's; regenerate replaces it; side-by-side answers twice (fine-tuned and base,
both equal to their own stream_chat reference); clear empties both; Stop with nothing running says
so; the run summary shows; and a
screenshot is saved to tests/artifacts/ui_chat.png (LLAMAFT_TEST_ARTIFACTS overrides the folder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)
selenium = pytest.importorskip("selenium", reason="needs selenium (pip install selenium)")
pytest.importorskip("gradio", reason="needs gradio (pip install 'gradio>=6')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from ui_helpers import letters_only_run  # noqa: E402
from llamaft.chat import ui, ui_state  # noqa: E402
from llamaft.model.generate import GenParams, stream_chat  # noqa: E402

PARAMS = GenParams(temperature=0, max_new_tokens=24)
SYSTEM = "Answer briefly."  # the run's data.system_prompt, which the UI pre-fills
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1500"]
# Records every text state of the fine-tuned column (to see partial, streamed replies) and of the
# status line (to know a new generation started, even when it ends with the same "done" text).
OBSERVE = """
window.__states = []; window.__status = [];
const watch = (sel, out) => { const el = document.querySelector(sel);
  new MutationObserver(() => out.push(el.innerText)).observe(el, {subtree: true, childList: true, characterData: true}); };
watch('#chat-tuned', window.__states); watch('#status', window.__status);
"""
# Read in one script call: elements re-render while streaming, so Python-side handles go stale.
TEXTS = "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText.split(/\\s+/).join(' ').trim())"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    run = letters_only_run(tmp_path_factory.mktemp("ui_browser"), system_prompt=SYSTEM)
    app = ui.build_app(run, params=PARAMS)
    ui.serve(app, port=0, block=False)
    yield run, app.local_url
    app.close()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="llamaft-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")  # a new empty profile every run
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # network events, for the offline check
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _replies(driver, chat_id: str) -> list[str]:
    return driver.execute_script(TEXTS, f"#{chat_id} [data-testid='bot']")


def _act_and_wait(driver, action, tuned: int, base: int = 0, timeout: float = 90) -> None:
    """Do `action`, then wait until a generation started after it has finished and both columns
    hold the expected number of replies, none still streaming."""
    seen = driver.execute_script("return window.__status.length")

    def ready(d):
        statuses = d.execute_script("return window.__status")[seen:]
        replies = _replies(d, "chat-tuned") + _replies(d, "chat-base")
        return (any(s.startswith("generating") for s in statuses) and _status(d).startswith("done")
                and len(_replies(d, "chat-tuned")) == tuned and len(_replies(d, "chat-base")) == base
                and not any(ui_state.CURSOR.strip() in r for r in replies))

    action()
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(ready)


def _status(driver) -> str:
    return (driver.execute_script(TEXTS, "#status") or [""])[0]


def _send(driver, text: str, enter: bool = False):
    def action():
        box = driver.find_element(By.CSS_SELECTOR, "#msg textarea")
        box.send_keys(text)
        if enter:
            box.send_keys(Keys.ENTER)
        else:
            driver.find_element(By.ID, "send").click()
    return action


def _expected(run: Path, history: list[dict], adapter: bool) -> str:
    from llamaft.model.inference import load_for_inference

    msgs = [{"role": "system", "content": SYSTEM}, *history]
    return " ".join("".join(stream_chat(*load_for_inference(run, adapter=adapter), msgs, PARAMS)).split())


def _external_requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    local = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:", "blob:", "chrome:", "about:")
    return [u for u in urls if not u.startswith(local)]


def test_chat_in_headless_chromium(served, browser):
    run, url = served
    d = browser
    t0 = time.time()
    d.get(url)
    WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#msg textarea"))
    assert d.find_element(By.CSS_SELECTOR, "#system textarea").get_attribute("value") == SYSTEM
    summary = d.find_element(By.ID, "summary").text
    assert "lora" in summary and "0.75" in summary and "1.234" in summary

    # 1. a message and its streamed reply (Send button)
    d.execute_script(OBSERVE)
    _act_and_wait(d, _send(d, "Hello there"), tuned=1)
    reply1 = _replies(d, "chat-tuned")[0]
    history = [{"role": "user", "content": "Hello there"}]
    assert reply1 and reply1 == _expected(run, history, adapter=True)
    states = d.execute_script("return window.__states")
    assert any(ui_state.CURSOR.strip() in s for s in states), "no partial (streaming) state was rendered"

    # 2. regenerate replaces the reply (greedy: the same text), it does not add one
    _act_and_wait(d, d.find_element(By.ID, "regenerate").click, tuned=1)
    assert _replies(d, "chat-tuned") == [reply1]

    # 3. side by side: the same prompt to the fine-tuned and the base model (Enter key this time)
    d.find_element(By.CSS_SELECTOR, "#side input[type=checkbox]").click()
    WebDriverWait(d, 30).until(lambda d: d.execute_script("const e = document.querySelector('#chat-base'); return !!e && e.offsetParent !== null"))
    _act_and_wait(d, _send(d, "What is LoRA", enter=True), tuned=2, base=2)
    # The base joined mid-conversation: its column holds the conversation so far, then its own reply.
    (tuned1, tuned2), (copied, base2) = _replies(d, "chat-tuned"), _replies(d, "chat-base")
    assert tuned1 == reply1 and copied == "(fine-tuned reply, kept as context) " + reply1
    history += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "What is LoRA"}]
    assert tuned2 and base2 and tuned2 != base2
    assert tuned2 == _expected(run, history, adapter=True)
    assert base2 == _expected(run, history, adapter=False)

    shot = Path(os.environ.get("LLAMAFT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts")) / "ui_chat.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # 4. clear empties both columns
    d.find_element(By.ID, "clear").click()
    WebDriverWait(d, 30).until(lambda d: not _replies(d, "chat-tuned") and not _replies(d, "chat-base"))

    # 5. Stop with no reply running says so (stopping a running reply: tests/chat/test_ui.py, without a browser)
    d.find_element(By.ID, "stop").click()
    WebDriverWait(d, 30).until(lambda d: _status(d) == "nothing to stop")

    assert _external_requests(d) == []  # fonts, scripts, telemetry: all local
    assert time.time() - t0 < 300
