"""The page of `siglip serve` in a real headless Chromium (Debian's, driven by Playwright):
a typed query fills the grid, a dropped image searches and "more like this" follows a hit,
an upload is classified, and a file name holding markup shows as text. The page's
Content-Security-Policy is bypassed here (Playwright's waits evaluate strings), which also
shows the escaping holds without it. Every state is saved
as a screenshot in the test's folder (and in $SIGLIP_SHOTS when set, for people to look at)."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

from .conftest import random_image
from .search_fixtures import cli, make_photos
from .serve_fixtures import Server

playwright_api = pytest.importorskip("playwright.sync_api", reason="the page tests need Playwright: pip install playwright")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("the page tests need Chromium (apt-get install chromium)", allow_module_level=True)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
HOSTILE = "<script>alert(1)<.png"
HOSTILE_IMG = "<img src=x onerror=alert(2)>.png"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("page")
    photos = make_photos(root / "photos", 10, size=(96, 80))
    random_image(500, (96, 80)).save(root / "photos" / HOSTILE)
    random_image(501, (96, 80)).save(root / "photos" / HOSTILE_IMG)
    env = {"SIGLIP_CACHE_DIR": str(root / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = root / "photos.npy"
    assert cli("embed", root / "photos", "--out", out, "--exact", env=env).exit_code == 0
    server = Server([out, "--exact"], env=env)
    yield {"server": server, "root": root, "photos": photos}
    assert server.stop() == 0


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, served, tmp_path):
    context = browser.new_context(viewport={"width": 1200, "height": 860}, bypass_csp=True)
    opened = context.new_page()
    dialogs, failures = [], []
    opened.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    opened.on("requestfailed", lambda request: failures.append(request.url))
    opened.on("request", lambda request: failures.append(request.url) if not request.url.startswith((served["server"].url, "blob:", "data:")) else None)
    opened.goto(served["server"].url + "/")
    opened.wait_for_selector("#model:not(:text('loading…'))")
    opened.dialogs, opened.failures = dialogs, failures
    yield opened
    assert not dialogs, f"a script ran: {dialogs}"
    assert not failures, f"requests to elsewhere or failed: {failures}"
    context.close()


def shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("SIGLIP_SHOTS"):
        Path(os.environ["SIGLIP_SHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["SIGLIP_SHOTS"]) / f"{name}.png"), full_page=True)


def test_a_typed_query_shows_the_grid_with_scores(page, served, tmp_path):
    page.get_by_label("Text").fill("a red car")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results li")
    page.wait_for_function("document.querySelectorAll('#results img').length >= 10")
    expected = served["server"].get("/v1/search", params={"q": "a red car", "k": 24}).json()[0]["results"]
    names = page.locator("#results .name").all_text_contents()
    assert names == [hit["path"] for hit in expected]  # the API's ranking, in order
    assert page.locator("#results .score").first.text_content().startswith("1. ")
    assert "%" in page.locator("#results .score").first.text_content()
    shot(page, tmp_path, "search")


def test_a_dropped_image_searches_and_more_like_this_follows(page, served, tmp_path):
    photo = served["photos"][3]
    data = base64.b64encode(photo.read_bytes()).decode()
    page.evaluate("""([data, name]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: 'image/png'}));
        document.getElementById('search-form').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    }""", [data, photo.name])
    page.wait_for_selector("#search-status:text('images like')")
    page.wait_for_selector("#results li")
    assert page.locator("#results .name").first.text_content() == str(photo)  # itself, first
    shot(page, tmp_path, "dropped")
    second = page.locator("#results .name").nth(1).text_content()
    button = page.get_by_role("button", name=f"More like {second}")
    button.focus()
    page.keyboard.press("Enter")  # by keyboard
    page.wait_for_selector("#search-status:text('more like')")
    page.wait_for_function("document.querySelector('#results .name') && document.querySelector('#results .name').textContent === %r" % second)
    shot(page, tmp_path, "more_like_this")


def test_an_upload_is_classified(page, served, tmp_path):
    page.get_by_label("Images").set_input_files([str(served["photos"][0]), str(served["photos"][1])])
    page.get_by_label("Labels, comma-separated").fill("a cat,a dog,<b>bold</b>")
    page.get_by_role("button", name="Classify").click()
    page.wait_for_selector(".scores table")
    expected = served["server"].post("/v1/classify", data={"labels": "a cat,a dog,<b>bold</b>"},
                                     files=[("image", (p.name, p.read_bytes())) for p in served["photos"][:2]]).json()
    headings = page.locator("#classified h3").all_text_contents()
    assert headings == [record["path"] for record in expected]
    first_labels = page.locator("#classified .scores").first.locator("td:first-child").all_text_contents()
    assert first_labels == [item["label"] for item in expected[0]["labels"]]
    assert "<b>bold</b>" in first_labels and page.locator("#classified b").count() == 0  # shown as text
    shot(page, tmp_path, "classify")


def test_file_names_holding_markup_show_as_text(page, served, tmp_path):
    page.get_by_label("Text").fill("anything")
    page.get_by_role("button", name="Search").click()
    page.wait_for_selector("#results li")
    page.get_by_label("Results").select_option("96")
    page.get_by_role("button", name="Search").click()
    page.wait_for_function("document.querySelectorAll('#results li').length === 12")
    names = page.locator("#results .name").all_text_contents()
    assert any(name.endswith(HOSTILE) for name in names) and any(name.endswith(HOSTILE_IMG) for name in names)
    assert page.locator("#results script").count() == 0 and page.locator("#results img[src='x']").count() == 0
    shot(page, tmp_path, "hostile_names")


def test_phone_width_and_keyboard(browser, served, tmp_path):
    context = browser.new_context(viewport={"width": 380, "height": 800}, is_mobile=True, bypass_csp=True)
    page = context.new_page()
    page.goto(served["server"].url + "/")
    page.wait_for_selector("#index-choice option", state="attached")
    page.keyboard.press("Tab")  # the API link, then the query box: every control is reachable
    focused = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
    assert {"query", "search-image", "index-choice", "k", "classify-images", "labels"} <= set(focused)
    page.get_by_label("Text").fill("a dog")
    page.keyboard.press("Enter")
    page.wait_for_selector("#results li")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 380, f"the page scrolls sideways at phone width ({width} px)"
    shot(page, tmp_path, "phone")
    context.close()


def test_the_token_is_asked_for_and_used(browser, tmp_path, served, tiny_checkpoint):
    out = served["root"] / "photos.npy"
    env = {"SIGLIP_CACHE_DIR": str(served["root"] / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    server = Server([out, "--exact", "--token", "letmein"], env=env)
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("#token-form:not([hidden])")
        page.get_by_label("Access token").fill("letmein")
        page.keyboard.press("Enter")
        page.wait_for_selector("#index-choice option", state="attached")
        page.get_by_label("Text").fill("a cat")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll('#results img').length >= 1")
        shot(page, tmp_path, "token")
    finally:
        context.close()
        assert server.stop() == 0


def test_a_video_frame_shows_its_time_code_and_a_video_is_classified(browser, tmp_path, tiny_checkpoint):
    pytest.importorskip("av", reason="video inputs need PyAV: pip install 'siglip-cli[video]'")
    from .video_fixtures import make_video

    folder = tmp_path / "media"
    from siglip_cli.core.video import time_code

    folder.mkdir()
    name = "<img src=x onerror=alert(3)>clip.mp4"
    clip = make_video(folder / name, seconds=3, size=(96, 80))
    env = {"SIGLIP_CACHE_DIR": str(tmp_path / "cache"), "SIGLIP_MODEL": str(tiny_checkpoint)}
    out = tmp_path / "frames.npy"
    assert cli("embed", clip, "--every", "0.5", "--out", out, "--exact", env=env).exit_code == 0
    server = Server([out, "--exact"], env=env)
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("#index-choice option", state="attached")
        page.get_by_label("Text").fill("a bar")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll('#results img').length === 6")  # every frame's thumbnail
        expected = server.get("/v1/search", params={"q": "a bar", "k": 10}).json()[0]["results"]
        codes = page.locator("#results .time").all_text_contents()
        assert codes == [time_code(hit["time"]) for hit in expected] and "00:00:01.5" in codes and "00:00:00" in codes
        assert page.locator("#results .name img").count() == 0  # the markup in the name is text
        shot(page, tmp_path, "video_frames")
        page.get_by_label("Images").set_input_files([str(clip)])
        page.get_by_label("Labels, comma-separated").fill("a bar,a field")
        page.get_by_role("button", name="Classify").click()
        page.wait_for_selector(".scores table")
        headings = page.locator("#classified h3").all_text_contents()
        assert headings == [f"{name}#t=0 · 00:00:00", f"{name}#t=2 · 00:00:02", f"{name} · 2 frames, best of each label"]
        assert page.locator("#classified img").count() == 0
        shot(page, tmp_path, "video_classified")
    finally:
        context.close()
        assert server.stop() == 0
