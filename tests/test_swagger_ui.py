"""The Swagger UI of a real ``bentoml serve``, driven in headless Chromium.

Debian's ``chromium`` and ``chromium-driver`` (Makefile ``TEST_APT_PACKAGES``, ``make test-deps``) through Selenium: the
page at ``/`` lists both endpoints; ``/predict`` is expanded, "Try it out", a PNG goes through the
page's file input, "Execute", and the 200 response body shown on the page is a prediction naming
one of the served model's classes. Screenshots of the page go to ``tmp_path``.

By default the served model is the tiny one of ``tests/serving_fixtures.py`` (its fixtures are
shared, not copied). ``make screenshots`` sets these to refresh the committed images instead:

``SWAGGER_BENTOML_HOME``
    serve ``fashion-classifier:latest`` (``configs/serving.yaml``) from this BentoML home;
``SWAGGER_IMAGE``
    the PNG to upload (default: a generated 28x28 grayscale PNG);
``SWAGGER_SCREENSHOT_DIR``
    where the screenshots go (``docs/`` for the committed ones).

The browser may only reach loopback: BentoML's index page links Google Tag Manager, and a test
must not depend on (or leak to) the internet.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import bentoml
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

import service
from serving.bentoml_bridge import model_store_at
from serving.lineage import served_tag
from tests.conftest import fmnist_pattern
from tests.serving_fixtures import bento_home as bento_home  # the shared fixture
from tests.serving_fixtures import tiny_model as tiny_model  # bento_home needs it
from tests.serving_helpers import TINY_CLASSES as CLASSES
from tests.serving_helpers import bentoml_serve

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
WINDOW = (1280, 1000)
#: Page loads and the Execute round trip (the first call warms the model): generous for 2 cores.
WAIT_S = 60
ENDPOINTS = ("/predict", "/batch_predict")

pytestmark = pytest.mark.slow


def stored_class_names(home: Path) -> list[str]:
    """Class names of the model ``service.py`` serves from BentoML home ``home``."""
    with model_store_at(home):
        stored = bentoml.models.get(served_tag(service.SETTINGS))
    names = stored.info.metadata["class_names"]
    assert isinstance(names, list), names
    return [str(name) for name in names]


@pytest.fixture(scope="module")
def served_model(request: pytest.FixtureRequest) -> tuple[Path, list[str]]:
    """The BentoML home to serve and its model's class names (the tiny model unless overridden)."""
    override = os.environ.get("SWAGGER_BENTOML_HOME")
    if override:
        home = Path(override).resolve()
        return home, stored_class_names(home)
    home = request.getfixturevalue("bento_home")
    assert stored_class_names(home) == CLASSES
    return home, CLASSES


@pytest.fixture(scope="module")
def server_url(
    served_model: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``bentoml serve service:Classifier`` (one worker) over the chosen BentoML home."""
    home, _ = served_model
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "FASHION_SERVE_SERVING__WORKERS": "1",
    }
    with bentoml_serve(env, tmp_path_factory.mktemp("swagger") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """Headless Chromium that can reach loopback only."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(binary), f"{binary} missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        # Every host name but loopback fails to resolve: no CDN, no analytics, no surprises.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def upload_png(tmp_path: Path) -> Path:
    """The PNG to upload: ``SWAGGER_IMAGE``, else a generated 28x28 grayscale garment-like image."""
    override = os.environ.get("SWAGGER_IMAGE")
    if override:
        return Path(override).resolve()
    path = tmp_path / "upload.png"
    Image.fromarray(fmnist_pattern(3, np.random.default_rng(0))).save(path)
    return path


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """Where screenshots go: ``SWAGGER_SCREENSHOT_DIR`` (``make screenshots``) or ``tmp_path``."""
    folder = Path(os.environ.get("SWAGGER_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait(driver: WebDriver) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, WAIT_S)


def operation(driver: WebDriver, path: str) -> WebElement:
    """The Swagger UI block of ``POST path``."""
    summary = driver.find_element(By.CSS_SELECTOR, f'.opblock-summary-path[data-path="{path}"]')
    block: WebElement = summary.find_element(
        By.XPATH, "./ancestor::div[contains(@class,'opblock ')]"
    )
    return block


def save_png(driver: WebDriver, path: Path) -> Path:
    """A screenshot of the current viewport, checked to be a real, non-blank PNG."""
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) > 100, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 10, f"{path} looks blank"
    return path


def test_swagger_page_predicts_an_uploaded_png(
    browser: WebDriver,
    server_url: str,
    served_model: tuple[Path, list[str]],
    upload_png: Path,
    screenshot_dir: Path,
) -> None:
    """Both endpoints listed; /predict run through the page returns 200 and a known label."""
    _, class_names = served_model
    browser.get(f"{server_url}/")
    wait(browser).until(
        expected_conditions.presence_of_element_located(
            (By.CSS_SELECTOR, '.opblock-summary-path[data-path="/batch_predict"]')
        )
    )
    listed = {
        element.get_attribute("data-path")
        for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-post .opblock-summary-path")
    }
    assert set(ENDPOINTS) <= listed, listed
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'start'});",
        browser.find_element(By.CSS_SELECTOR, ".opblock-tag-section"),
    )
    save_png(browser, screenshot_dir / "swagger-endpoints.png")

    block = operation(browser, "/predict")
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    try_it_out = wait(browser).until(lambda _: block.find_element(By.CSS_SELECTOR, ".try-out__btn"))
    try_it_out.click()
    file_input = wait(browser).until(
        lambda _: block.find_element(By.CSS_SELECTOR, 'input[type="file"]')
    )
    file_input.send_keys(str(upload_png))
    block.find_element(By.CSS_SELECTOR, "button.execute").click()

    status = wait(browser).until(
        lambda _: block.find_element(
            By.CSS_SELECTOR, ".live-responses-table .response .response-col_status"
        )
    )
    body = block.find_element(
        By.CSS_SELECTOR, ".live-responses-table .response-col_description pre"
    )
    wait(browser).until(lambda _: body.text.strip().endswith("}"))
    assert status.text.strip() == "200", f"status {status.text!r}, body {body.text!r}"
    prediction = json.loads(body.text)
    assert prediction["label"] in class_names
    assert prediction["label"] == class_names[prediction["class_id"]]
    assert set(prediction["scores"]) == set(class_names)
    assert prediction["confidence"] == pytest.approx(max(prediction["scores"].values()))

    # Frame the request (the chosen file) and the response body in one viewport.
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'start'});",
        block.find_element(By.CSS_SELECTOR, ".opblock-section-request-body"),
    )
    save_png(browser, screenshot_dir / "swagger-predict.png")
