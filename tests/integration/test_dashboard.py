"""The launcher's dashboard in a real headless browser (Debian's chromium + chromedriver, driven
by Selenium): the page of a running launcher shows that launcher's state and follows it live."""
import json
import shutil
import time
import urllib.request

import pytest

from fixtures.launcher import wait_until
from nodepool.client import RequestFailed
from nodepool.model.records import ImageBuild, ImageUpload
from nodepool.model.states import BuildState, UploadState

pytestmark = pytest.mark.slow

CONFIG = """\
webapp:
  port: 0
  listen_address: 127.0.0.1
labels:
  - name: small
    min-ready: 1
  - name: big
  - name: doomed
  - name: slow
providers:
  - name: sim
    driver: simulated
    boot-time: 0.3
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: small
            cloud-image: img
          - name: big
            cloud-image: img
  - name: bad
    driver: simulated
    boot-time: 0.05
    boot-failure-rate: 1.0
    launch-retries: 1
    cloud-images:
      - name: img
    pools:
      - name: p1
        labels:
          - name: doomed
            cloud-image: img
  - name: slowcloud
    driver: simulated
    boot-time: 600
    cloud-images:
      - name: img
    pools:
      - name: p1
        labels:
          - name: slow
            cloud-image: img
"""

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (scripts/install-deps.sh installs it)")
    if not CHROMEDRIVER or not CHROMIUM:
        pytest.skip("chromium / chromium-driver not installed (scripts/install-deps.sh "
                    "installs them from Debian)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1800", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except Exception as exc:        # noqa: BLE001 - e.g. no usable display libraries
        pytest.skip(f"chromium cannot run here: {exc}")
    yield driver
    driver.quit()


def add_uploads(store, image, provider, ages):
    """Ready uploads of ``image`` to ``provider`` made ``ages`` seconds ago (one build each)."""
    made = []
    for n, age in enumerate(ages):
        build = store.create_build(ImageBuild(image=image, state=BuildState.READY,
                                              state_time=time.time() - age - 60,
                                              builder="test", formats="qcow2"))
        up = store.create_upload(ImageUpload(
            image=image, build_id=build.id, provider=provider, state=UploadState.READY,
            state_time=time.time() - age, external_id=f"ext-{image}-{n}",
            external_name=f"{image}-{n}", format="qcow2"))
        made.append(up)
    return made


def text_of(driver, selector):
    return driver.find_element("css selector", selector).text


def test_dashboard_shows_the_running_launcher(sqlite_launcher_env, browser, tmp_path):
    env = sqlite_launcher_env
    env.write(CONFIG)
    launcher = env.start_launcher(webapp=True)
    store = env.store()
    client = env.client(requestor="dash-test")
    wait_until(lambda: any(n.state.value == "ready" and "small" in n.type and not n.allocated_to
                           for n in store.list_nodes()), message="a free ready small node")
    for labels in (["small"], ["big"]):
        nodes = client.request(labels, timeout=30)
        client.use(nodes)
        client.release(nodes)
    with pytest.raises(RequestFailed):
        client.request(["doomed"], timeout=30)
    waiting = client.submit(["slow"])
    add_uploads(store, "ubuntu", "sim", [3 * 3600, 26 * 3600])

    base = f"http://127.0.0.1:{launcher.webapp.port}"
    # the data the page polls
    with urllib.request.urlopen(f"{base}/dashboard.json") as resp:
        data = json.load(resp)
    assert {(r["label"], r["provider"]) for r in data["nodes"]} >= {
        ("small", "sim"), ("big", "sim"), ("doomed", "bad"), ("slow", "slowcloud")}

    browser.get(f"{base}/dashboard")
    wait = lambda cond, what: wait_until(cond, timeout=30, interval=0.2, message=what)  # noqa
    wait(lambda: browser.find_elements("css selector", "body[data-updated]"), "first poll")
    # nodes per label and provider: the min-ready "small" node is ready (its replacement for
    # the node the request took may still be booting at the first poll)

    def small_row():
        rows = [r.text for r in browser.find_elements("css selector", "#nodes tbody tr")]
        return next(r for r in rows if r.startswith("small sim")).split()
    wait(lambda: small_row()[2] == "1", "one ready small node shown")
    assert {r.text.split()[0] for r in browser.find_elements(
        "css selector", "#nodes tbody tr")} == {"small", "big", "doomed", "slow"}
    assert launcher.hostname in text_of(browser, "#launchers")
    # the waiting request and its age
    wait(lambda: waiting.id in text_of(browser, "#requests"), "the waiting request")
    assert "slow" in text_of(browser, "#requests")
    # images: current and previous upload with their ages
    images = text_of(browser, "#images")
    assert "ubuntu sim ubuntu-0" in images and "3.0h ubuntu-1" in images \
        and "26.0h" in images
    # waits: small was served from the ready pool, big had to be launched
    # (each launcher writes its waits to the store at most every 5 s)
    wait(lambda: "big" in text_of(browser, "#waits"), "wait rows")
    waits_text = text_of(browser, "#waits").splitlines()
    assert any(line.startswith("small 1 100% (1/1)") for line in waits_text), waits_text
    assert any(line.startswith("big 1 0% (0/1)") for line in waits_text), waits_text
    wait(lambda: int(browser.find_element("css selector", "#chart-warm")
                     .get_attribute("data-points")) > 0, "points on the warm-hit chart")
    assert int(browser.find_element("css selector", "#chart-wait")
               .get_attribute("data-points")) > 0
    # the launch failure with its reason
    wait(lambda: "doomed" in text_of(browser, "#failures"), "the launch failure")
    assert "ERROR" in text_of(browser, "#failures")

    # it follows the launcher live: a new waiting request shows up without a reload
    second = client.submit(["slow"])
    wait(lambda: second.id in text_of(browser, "#requests"), "the new request, live")
    assert text_of(browser, "#requests-count") == "2"

    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
