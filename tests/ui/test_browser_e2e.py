"""The web UI in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright) against
``sdtune ui`` serving a temporary root.

It edits a caption and checks the sidecar file, starts a textual-inversion run on the built-in model from the
generated form, sees the loss plot and a preview image appear, stops the run and sees its checkpoint, then
opens the results. No browser is downloaded: the system's Chromium is used (``apt-get install -y chromium``;
``.ci/run`` installs it). Set ``SDTUNE_UI_SCREENSHOTS=docs/ui`` to refresh the README's screenshots.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from sdtune.config import load_train_config
from sdtune.ui.jobs import process_matches, read_pid_file
from sdtune.world import write_concept_dataset

pytestmark = pytest.mark.slow


def chromium() -> str:
    """The system's Chromium. Missing: the test is skipped with the reason, unless ``SDTUNE_REQUIRE_BROWSER=1``
    (set by .ci/run, which installs the browser) makes it a failure."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        reason = "no Chromium found: install Debian's browser with `apt-get install -y chromium` (.ci/run does)"
        if os.environ.get("SDTUNE_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail(f"{reason}; SDTUNE_REQUIRE_BROWSER is set, so a missing browser is a failure")
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui(tmp_path):
    """``sdtune ui`` on a free port with one root holding a small dataset; training jobs are ended afterwards."""
    chromium()  # skip (or fail, see chromium()) before starting a server no browser will visit
    root = tmp_path / "root"
    write_concept_dataset("teal_heart", root / "datasets" / "teal", n=8)
    (root / "datasets" / "teal" / "left-over.txt").write_text("a caption whose image was deleted\n")
    (tmp_path / "outside.txt").write_text("not for the browser")
    port = free_port()
    env = os.environ | {"OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path / "ui-server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "sdtune.cli.main", "ui", "--root", str(root), "--port", str(port)],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("sdtune ui did not start:\n" + (tmp_path / "ui-server.log").read_text())
            time.sleep(0.3)
        yield url, root, tmp_path
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        for pid_file in (root / "runs").glob("*/ui.pid"):  # jobs outlive the UI by design: end ours here
            info = read_pid_file(pid_file.parent)
            if info and process_matches(info["pid"], info["argv"]):
                os.kill(info["pid"], signal.SIGKILL)


def screenshot(page, name: str, tmp_path: Path, full_page: bool = True) -> None:
    folder = Path(os.environ.get("SDTUNE_UI_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=full_page)


def test_caption_edit_training_run_stop_and_results_in_a_browser(ui):
    url, root, tmp_path = ui
    start = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)

        # -- Datasets: a path escape is refused, then open the dataset and edit one caption
        page.locator("#dataset-path textarea").fill("../")
        page.locator("#dataset-open").click()
        expect(page.locator("#dataset-message")).to_contain_text("outside the folders this UI may use")
        outside = page.request.get(f"{url}gradio_api/file={tmp_path / 'outside.txt'}")
        assert outside.status == 403  # gradio's file route serves only the roots

        page.locator("#dataset-path textarea").fill("datasets/teal")
        page.locator("#dataset-open").click()
        expect(page.locator("#dataset-message")).to_contain_text("8 images")
        page.get_by_role("button", name="Thumbnail 3 of 8").click()
        sidecar = root / "datasets" / "teal" / "0002.txt"
        original = sidecar.read_text()
        expect(page.locator("#dataset-image input")).to_have_value("0002.png")
        caption = page.locator("#dataset-caption textarea")
        expect(caption).to_have_value(original.strip())  # the sidecar's text, loaded for this image
        caption.fill("a teal heart, edited in the browser")
        page.locator("#dataset-save-caption").click()
        expect(page.locator("#caption-message")).to_contain_text("saved")
        assert sidecar.read_text() == "a teal heart, edited in the browser\n" != original
        page.locator("#dataset-check").get_by_text("Dataset check").click()
        page.locator("#dataset-run-check").click()
        expect(page.locator("#check-message")).to_contain_text("pass: 8 images read, 8 usable", timeout=30_000)
        expect(page.locator("#dataset-check")).to_contain_text("orphan_caption")
        screenshot(page, "datasets", tmp_path)

        # -- Train: the generated textual-inversion form, filled and started
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#train-method input")).to_have_value("textual_inversion")
        page.locator("#train-validate").click()  # an empty form: the CLI's one-line errors
        expect(page.locator("#train-message")).to_contain_text("name: required; e.g. my-concept")

        def fill(key: str, value) -> None:
            box = page.locator(f"#textual_inversion--{key.replace('.', '-')}")
            expect(box).to_be_visible()  # folded groups render their fields once opened
            field = box.locator("textarea, input").first
            field.fill(str(value))
            field.blur()
            expect(field).to_have_value(str(value))

        fill("name", "teal-ui")
        fill("token", "<teal-ui>")
        fill("data.path", "datasets/teal")
        fill("data.batch_size", 2)
        fill("train.max_steps", 1000)  # the stop ends it long before: 200 steps can finish in ~20 s
        for group in ("save", "preview"):  # folded by default
            page.locator(f"#textual_inversion--group-{group}").get_by_text(f"{group} settings").click()
        fill("save.every_n_steps", 20)
        fill("preview.every_n_steps", 20)
        fill("preview.steps", 10)
        page.locator("#train-validate").click()
        expect(page.locator("#train-message")).to_contain_text("valid textual_inversion config")
        page.locator("#train-config-path textarea").fill("configs/teal-ui.yaml")
        page.locator("#train-save").click()
        expect(page.locator("#train-message")).to_contain_text("sdtune train")
        saved = load_train_config(root / "configs" / "teal-ui.yaml")
        assert (saved.name, saved.train.max_steps, saved.data.path) == ("teal-ui", 1000, str(root / "datasets/teal"))
        assert (saved.data.batch_size, saved.save.every_n_steps) == (2, 20)
        assert (saved.preview.every_n_steps, saved.preview.steps) == (20, 10)  # every field filled reached the file
        fill("name", "changed-then-loaded")
        page.locator("#train-load").click()  # loading the saved file puts its values back in the form
        expect(page.locator("#train-message")).to_contain_text("loaded a textual_inversion config")
        expect(page.locator("#textual_inversion--name textarea")).to_have_value("teal-ui")
        page.evaluate("window.scrollTo(0, 0)")
        screenshot(page, "train", tmp_path, full_page=False)
        page.locator("#train-start").click()
        expect(page.locator("#train-message")).to_contain_text("started teal-ui", timeout=30_000)

        # -- Runs: live loss plot and previews, then a graceful stop with a checkpoint
        run = root / "runs" / "teal-ui"
        assert load_train_config(run / "config.yaml") == saved  # the run is reproducible from the saved file
        expect(page.locator("#runs-run input")).to_have_value("runs/teal-ui")
        expect(page.locator("#runs-loss img")).to_be_visible(timeout=90_000)
        expect(page.locator("#runs-previews")).to_contain_text("step 20", timeout=90_000)
        expect(page.locator("#runs-previews img").first).to_be_visible()
        expect(page.locator("#runs-status")).to_contain_text("running")
        page.locator("#runs-stop").click()
        expect(page.locator("#runs-message")).to_contain_text("stop requested")
        status = page.locator("#runs-status")
        expect(status).to_contain_text("stopped", timeout=90_000)
        step = int(re.search(r"step (\d+) / 1000", status.inner_text()).group(1))
        assert 20 <= step < 1000
        expect(status).to_contain_text(f"step-{step}")  # the checkpoint written at the stop
        assert (run / "checkpoints" / f"step-{step}" / "state.json").is_file()
        expect(page.locator("#runs-log textarea")).to_have_value(re.compile("stopped on request"))
        screenshot(page, "runs", tmp_path)

        # -- Results: before/after grids, numbers, output files
        page.get_by_role("tab", name="Results").click()
        expect(page.locator("#results-run input")).to_have_value("runs/teal-ui")
        expect(page.locator("#results-after img")).to_be_visible(timeout=30_000)
        files = page.locator("#results-files")
        expect(files.get_by_role("cell", name="teal-ui.safetensors")).to_be_visible()
        row = files.get_by_role("row").filter(has=page.get_by_role("cell", name="teal-ui.safetensors"))
        download = page.request.get(row.get_by_role("link").get_attribute("href"))
        assert download.body() == (run / "output" / "teal-ui.safetensors").read_bytes()
        expect(page.locator("#results-prompt textarea")).to_have_value("a <teal-ui> on a blue background")
        page.locator("#results-generate").click()  # "generate with this": sdtune generate with the embedding
        expect(page.locator("#generate-message")).to_contain_text("1 image(s) with seed 0", timeout=120_000)
        expect(page.locator("#results-generated img").first).to_be_visible()
        screenshot(page, "results", tmp_path)
        browser.close()
    assert time.monotonic() - start < 240
