"""The browser demo driven as a person uses it: `python -m signllava.app` in its own process, headless Chromium
through Selenium, the page's upload / Translate / outputs read back. tests/test_app.py checks with it; run as a
script it writes the README's screenshot from any checkpoint and video:

    python -m tests.app_kit --checkpoint C --video V.mp4 --out docs/app.png [--segments auto] [--max_new_tokens 24]

Selenium, not Playwright: Debian's chromium-driver is built from the same source as its chromium, so the driver
speaks exactly that browser's protocol; Playwright's driver is made for its own Chromium builds (which it
downloads) and needs a Node runtime besides. With the driver's path given, Selenium Manager (which would reach
the network) is never started.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.kit import REPO, _free_port, script_env

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000")


def missing_browser() -> str | None:
    """Why the page cannot be driven here, or None."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "chromium is not installed (apt-get install -y chromium chromium-driver)"
    if not (Path(CHROMEDRIVER).is_file() or shutil.which("chromedriver")):
        return "chromium-driver is not installed (apt-get install -y chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (requirements.txt)"
    return None


@contextmanager
def app_server(checkpoint: Path, folder: Path, *flags, timeout: float = 300) -> Iterator[str]:
    """`python -m signllava.app --checkpoint C FLAGS` on a free port -> its URL, once it serves the page. Its
    output goes to folder/app.log, shown when it fails to start; gradio's uploads go under `folder` too."""
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    cmd = [sys.executable, "-m", "signllava.app", "--checkpoint", str(checkpoint), "--port", str(port), *map(str, flags)]
    with (folder / "app.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=script_env(GRADIO_TEMP_DIR=folder / "gradio", OMP_NUM_THREADS=1))
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_for_page(url, proc, folder / "app.log", timeout)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_page(url: str, proc: subprocess.Popen, log: Path, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the app exited {proc.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as res:
                if res.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not serve {url} in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@contextmanager
def chrome() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    driver = CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else shutil.which("chromedriver")
    page = webdriver.Chrome(service=Service(driver), options=options)
    page.set_script_timeout(30)
    try:
        yield page
    finally:
        page.quit()


# ------------------------------------------------------------------------------------------ the page
def wait_for(page, condition, timeout: float = 180):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(page, timeout, poll_frequency=0.2).until(condition)


def translate_in_page(page, url: str, video: Path) -> str:
    """Open the page, upload `video`, click Translate -> the status line once the result is there (the other
    outputs render after it: wait for them too)."""
    from selenium.webdriver.common.by import By
    page.get(url)
    upload = wait_for(page, lambda p: p.find_elements(By.CSS_SELECTOR, "#video_in input[type=file]"))[0]
    upload.send_keys(str(video))
    # The upload is finished when the input shows its player (a click before that would send no video).
    wait_for(page, lambda p: p.find_elements(By.CSS_SELECTOR, "#video_in video"))
    page.find_element(By.CSS_SELECTOR, "#translate").click()
    return wait_for(page, lambda p: p.find_element(By.CSS_SELECTOR, "#status").text.strip())


def table_rows(page, elem_id: str) -> list[list[str]]:
    """A gr.Dataframe's rows as the grid shows them (by its ARIA roles; the grid renders the rows in view,
    which for a few rows is all of them); the empty grid of a fresh page has none."""
    return page.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' [role=row]'))"
        ".map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))"
        ".filter(r => r.some(c => c !== ''))", f"#{elem_id}")


def subtitle_track(page) -> dict | None:
    """The output <video>'s <track>: its kind, its file as served and the cues the browser parsed from it."""
    return page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const video = document.querySelector('#video_out video');
        const track = video && video.querySelector('track');
        if (!track) { done(null); return; }
        const cues = () => Array.from(video.textTracks[0].cues || []).map(c => [c.startTime, c.endTime, c.text]);
        fetch(track.src).then(r => r.text()).then(text => {
            const finish = () => done({kind: track.kind, text: text, cues: cues()});
            if (track.readyState === 2) finish(); else track.addEventListener('load', finish);
        });""")


def resource_hosts(page) -> set[str]:
    """Every host the page has loaded anything from."""
    return set(page.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).host)"))


def save_screenshot(page, path: Path, at_seconds: float):
    """The whole page, the player stopped at `at_seconds` (inside a subtitle, so that it shows)."""
    page.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const video = document.querySelector('#video_out video');
        video.addEventListener('seeked', () => done(), {once: true});
        video.currentTime = arguments[0];""", at_seconds)
    page.set_window_size(1280, page.execute_script("return document.documentElement.scrollHeight") + 120)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not page.save_screenshot(str(path)):
        raise RuntimeError(f"{path}: the browser wrote no screenshot")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--video", required=True, type=Path)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "app.png")
    p.add_argument("--segments", default="auto")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=24)
    args = p.parse_args(argv)
    if missing_browser():
        p.error(missing_browser())
    import tempfile
    with tempfile.TemporaryDirectory() as tmp, app_server(
            args.checkpoint, Path(tmp), "--segments", args.segments, "--num_beams", args.num_beams,
            "--max_new_tokens", args.max_new_tokens) as url, chrome() as page:
        from selenium.common.exceptions import TimeoutException
        print(translate_in_page(page, url, args.video.resolve()))
        try:
            track = wait_for(page, subtitle_track, timeout=30)
        except TimeoutException:            # nothing translated: the page says why, and that is the picture
            track = None
        first = track["cues"][0] if track and track["cues"] else [0.0, 0.0]
        save_screenshot(page, args.out, (first[0] + first[1]) / 2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
