"""The web page at / in headless Chromium, driving a real generation against the app on 127.0.0.1.

Uses Debian's ``chromium`` + ``chromedriver`` (``apt-get install chromium chromium-driver``) through the
W3C WebDriver protocol, spoken here over HTTP to chromedriver on loopback (no Selenium dependency).
Chromium runs with background networking off and every host name except 127.0.0.1 unresolvable, so
the page can reach nothing but the app. Skipped, saying why, when the binaries are missing.
"""

import base64
import io
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from musar_core import MusarConfig
from serve.config import (
    AutoscalingConfig,
    BatchingConfig,
    DefaultsConfig,
    IngressDeploymentConfig,
    ModelDeploymentConfig,
    ServeAppConfig,
)  # fmt: skip

APP = "musar-web-test"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


class WebDriver:
    """The few W3C WebDriver commands the test needs, over HTTP to a local chromedriver."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.http = requests.Session()
        self.http.trust_env = False
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
                "--disable-client-side-phishing-detection", "--no-proxy-server",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]  # fmt: skip
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}}  # fmt: skip
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, payload: dict | None = None):
        r = self.http.request(method, self.base + path, json=payload, timeout=60)
        value = r.json().get("value")
        if r.status_code != 200:
            raise RuntimeError(f"WebDriver {method} {path}: {r.status_code} {value}")
        return value

    def cmd(self, method: str, path: str, payload: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", payload)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def find_all(self, css: str) -> list[str]:
        return [e[ELEMENT] for e in self.cmd("POST", "/elements", {"using": "css selector", "value": css})]

    def type(self, element: str, text: str) -> None:
        self.cmd("POST", f"/element/{element}/clear", {})
        self.cmd("POST", f"/element/{element}/value", {"text": text})

    def upload(self, element: str, path: str) -> None:
        self.cmd("POST", f"/element/{element}/value", {"text": path})

    def click(self, element: str) -> None:
        self.cmd("POST", f"/element/{element}/click", {})

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout_s: float = 60):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"page never satisfied: {script}")

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        except Exception:
            pass


@pytest.fixture(scope="module")
def app(ray_local, tiny_flux_path):
    from ray import serve

    from musar.serving import run_serve
    from serve.local import free_port

    cfg = ServeAppConfig(
        model=str(tiny_flux_path), musar=MusarConfig(condition_size=32), app_name=APP, port=free_port(),
        defaults=DefaultsConfig(steps=2, height=64, width=64),
        batching=BatchingConfig(max_batch_size=4, batch_wait_timeout_s=0.01),
        model_deployment=ModelDeploymentConfig(autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1)),
        ingress=IngressDeploymentConfig(num_cpus=0),
    )  # fmt: skip
    url = run_serve(cfg, block=False)  # what `musar serve` runs, without waiting for Ctrl-C
    assert url.startswith("http://127.0.0.1:")
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from serve.local import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}", "--allowed-ips=127.0.0.1", f"--log-path={log}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 30
        while True:
            try:
                with requests.Session() as s:
                    s.trust_env = False
                    if s.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["value"]["ready"]:
                        break
            except requests.RequestException:
                if time.time() > deadline:
                    raise
            time.sleep(0.2)
        driver = WebDriver(port)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def png_file(path, colour) -> str:
    Image.new("RGB", (48, 40), colour).save(path)
    return str(path)


def test_page_generates_with_two_subjects_and_shows_the_routing_map(app, browser, tmp_path):
    red, blue = png_file(tmp_path / "ball.png", "red"), png_file(tmp_path / "cube.png", "blue")
    browser.get(app + "/")
    browser.wait_for("return document.getElementById('subject-limit').textContent.includes('of at most')")
    browser.type(browser.find("#prompt"), "a red ball and a blue cube")
    rows = browser.find_all("#subjects .subject")
    assert len(rows) == 2  # the page starts with two subject rows
    files, phrases = browser.find_all(".subject-image"), browser.find_all(".subject-phrase")
    for file_input, phrase_input, path, phrase in zip(files, phrases, (red, blue), ("red ball", "blue cube")):
        browser.upload(file_input, path)
        browser.type(phrase_input, phrase)
    browser.type(browser.find("#seed"), "4")
    browser.type(browser.find("#steps"), "2")
    assert browser.js("return document.getElementById('routing').checked") is True
    browser.click(browser.find("#generate"))
    browser.wait_for("return document.getElementById('result-image').naturalWidth > 0 && "
                     "document.getElementById('routing-map').naturalWidth > 0")  # fmt: skip
    assert browser.js("return document.getElementById('error').textContent") == ""
    assert browser.js("return document.getElementById('result-image').naturalWidth") == 64
    assert browser.js("return document.getElementById('routing-map').naturalWidth") == 256 * 3
    assert "seed 4" in browser.js("return document.getElementById('caption').textContent")

    # What the page showed is what the API returns for the same request.
    shown = browser.js("return document.getElementById('result-image').src").split(",", 1)[1]
    with requests.Session() as s:
        s.trust_env = False
        files = {"prompt": (None, "a red ball and a blue cube"), "seed": (None, "4"), "steps": (None, "2"),
                 "subjects[0].image": ("ball.png", Path(red).read_bytes()), "subjects[0].phrase": (None, "red ball"),
                 "subjects[1].image": ("cube.png", Path(blue).read_bytes()), "subjects[1].phrase": (None, "blue cube")}  # fmt: skip
        api = s.post(app + "/v1/generate", files=files, timeout=60)
    assert api.status_code == 200
    page_px = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown))).convert("RGB"), dtype=np.int16)
    api_px = np.asarray(Image.open(io.BytesIO(api.content)).convert("RGB"), dtype=np.int16)
    assert np.abs(page_px - api_px).max() <= 2


def test_page_shows_the_api_error_and_recovers(app, browser, tmp_path):
    browser.get(app + "/")
    browser.wait_for("return document.getElementById('subject-limit').textContent.includes('of at most')")
    browser.type(browser.find("#prompt"), "a red ball and a blue cube")
    for file_input, phrase_input, phrase in zip(browser.find_all(".subject-image"), browser.find_all(".subject-phrase"),
                                                ("red ball", "green pyramid")):  # fmt: skip
        browser.upload(file_input, png_file(tmp_path / f"{phrase}.png", "red"))
        browser.type(phrase_input, phrase)
    browser.click(browser.find("#generate"))
    error = browser.wait_for("return document.getElementById('error').textContent")
    assert error.startswith("422: subjects[1].phrase:") and "green pyramid" in error
    browser.type(browser.find_all(".subject-phrase")[1], "blue cube")  # fix it and generate again
    browser.click(browser.find("#generate"))
    browser.wait_for("return document.getElementById('result-image').naturalWidth > 0")
    assert browser.js("return document.getElementById('error').textContent") == ""
