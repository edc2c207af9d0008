"""The playground in headless Chromium (selenium + chromedriver): type, send, see the streamed answer.

Needs Debian's Chromium and its driver: `apt-get install -y chromium chromium-driver` (and selenium,
in the dev extra). Skipped, saying so, when they are missing.
"""
import shutil
from pathlib import Path

import pytest

from ..helpers import probe_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver"

if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip(f"headless Chromium not found ({CHROMIUM}, {CHROMEDRIVER}): {INSTALL}", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[dev]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TIMEOUT = 90  # seconds; generous for a shared 2-core machine


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()


def open_playground(browser, url):
    browser.get(url + "/")
    WebDriverWait(browser, TIMEOUT).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))


def send(browser, text):
    before = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
    box = browser.find_element(By.ID, "message")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    columns = len(browser.find_elements(By.CSS_SELECTOR, ".column"))
    WebDriverWait(browser, TIMEOUT).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) >= before + columns)
    return [column.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
            for column in browser.find_elements(By.CSS_SELECTOR, ".column")]


def test_chat_in_the_playground_with_probe_and_baseline(browser, live_server, model, baseline_model):
    server = live_server(probe=probe_for(model), baseline=baseline_model)  # the probe never trips
    open_playground(browser, server.url)
    assert not browser.find_element(By.ID, "key-field").is_displayed()  # no key configured
    assert len(browser.find_elements(By.CSS_SELECTOR, ".column")) == 2
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("8")
    broken, base = send(browser, "How do I bake bread?")
    for answer in (broken, base):
        assert answer.get_attribute("data-error") is None, answer.text
        assert answer.find_element(By.CSS_SELECTOR, ".body").text.strip()
        assert "finish: length" in answer.text
    shaded = broken.find_elements(By.CSS_SELECTOR, ".tok[title^='score']")
    assert shaded  # tokens of the circuit-broken model carry their probe scores
    assert not base.find_elements(By.CSS_SELECTOR, ".tok[title^='score']")



def test_a_trip_shows_a_banner(browser, live_server, model):
    server = live_server(probe=probe_for(model, threshold_logit=-1e9), refusal="No.")  # every first token trips
    open_playground(browser, server.url)
    (answer,) = send(browser, "How do I bake bread?")
    assert answer.get_attribute("data-tripped") == "true"
    assert "Circuit breaker tripped at token 0" in answer.find_element(By.CSS_SELECTOR, ".banner").text
    assert answer.find_element(By.CSS_SELECTOR, ".refusal").text == "No."


def test_playground_with_an_api_key(browser, live_server):
    server = live_server(api_key="play-key")
    open_playground(browser, server.url)  # the page itself needs no key
    assert browser.find_element(By.ID, "key-field").is_displayed()
    (answer,) = send(browser, "hi")
    assert answer.get_attribute("data-error") == "true" and "API key" in answer.text
    browser.find_element(By.ID, "key").send_keys("play-key")
    (answer,) = send(browser, "hi again")
    assert answer.get_attribute("data-error") is None, answer.text
