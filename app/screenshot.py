"""Drive the app in a real headless browser (Debian's `chromium` through Playwright) and take a screenshot.

    python -m app.screenshot --base toy --adapters out --out docs/app.png [--adapter out/demo] [--prompt ...]

starts the app in this process on a free 127.0.0.1 port, opens it in Chromium, (loads an adapter,) types a
prompt, clicks Generate, waits for the images in the gallery and saves a screenshot. `tests/test_app.py`
uses the same helpers. Chromium comes from `bash scripts/install_browser.sh`; Playwright from pip (no
browser download).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_browser(playwright):
    path = chromium_path()
    if path is None:
        raise RuntimeError("chromium is not installed; run: bash scripts/install_browser.sh")
    return playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)


def generate_in_browser(page, url: str, prompt: str, timeout_ms: int = 120_000, adapter_label: str | None = None,
                        num_images: int | None = None) -> int:
    """Open the app, optionally load an adapter from the folder list, type `prompt`, click Generate and wait
    until the gallery shows images; returns how many."""
    page.goto(url, wait_until="networkidle")
    if adapter_label:
        page.locator("#adapter-file input").click()
        page.get_by_role("option", name=adapter_label, exact=True).click()
        page.locator("#load").click()
        page.get_by_text("trainable parameters").wait_for(timeout=timeout_ms)
    if num_images:
        box = page.get_by_label("number input for Number of images")
        box.fill(str(num_images))
        box.press("Enter")
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate").click()
    images = page.locator("#gallery img")
    images.first.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function("() => !document.querySelector('#gallery .wrap.generating, #gallery .progress-text')",
                           timeout=timeout_ms)
    return images.count()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.screenshot", description=__doc__.splitlines()[0])
    p.add_argument("--base", default="toy")
    p.add_argument("--adapters", default="out")
    p.add_argument("--adapter", default=None, help="label of an adapter in the folder list to load first")
    p.add_argument("--prompt", default="a photo of sks star")
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--out", default="docs/app.png")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=1000)
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from .core import Studio
    from .ui import launch

    studio = Studio(args.base, args.adapters)
    port = free_port()
    demo = launch(studio, port=port, block=False, quiet=True)
    try:
        with sync_playwright() as pw:
            browser = launch_browser(pw)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            n = generate_in_browser(page, f"http://127.0.0.1:{port}/", args.prompt, adapter_label=args.adapter,
                                    num_images=args.num_images)
            page.mouse.move(0, 0)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
        print(f"{n} image(s) in the gallery; screenshot: {args.out}")
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
