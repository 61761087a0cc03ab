"""The Gradio app, started as users start it (`python -m app --base DIR --adapters DIR --port P` on 127.0.0.1)
and driven through `gradio_client` (generate, adapters, compare/sweep, training, bad input) and through a real
headless Chromium (Playwright + Debian's `chromium`, installed by scripts/install_browser.sh).

A tiny random Stable Diffusion folder (16x16 images) stands in for the base model, so the module runs in
well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_components, tiny_pipeline
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from app.screenshot import chromium_path, free_port, generate_in_browser, launch_browser  # noqa: E402
from superlora_diffusers import SuperLoRAConfig  # noqa: E402
from superlora_diffusers.model import inject_superlora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAR = sorted((ROOT / "examples" / "striped_star").glob("*.png"))
NO_SCALES = (1.0, 1.0, 1.0, 1.0)


def save_adapter(pipe, folder: Path, prompt: str, seed: int = 0) -> Path:
    """A SuperLoRA with random (non-zero) factors, so it visibly changes the images."""
    module = inject_superlora(pipe._superlora_components(), SuperLoRAConfig.lorta(rank=2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = pipe.save_superlora_weights(folder, metadata={"instance_prompt": prompt})
    pipe.unload_superlora_weights()
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    base = root / "base"
    pipe = tiny_pipeline(0)
    pipe.save_pretrained(base)
    adapters = root / "adapters"
    save_adapter(pipe, adapters / "sks-star", "a photo of sks star")
    save_adapter(pipe, adapters / "nested" / "polka", "a photo of pqp circle", seed=1)
    (adapters / "sks-star" / "checkpoint-10").mkdir()  # checkpoints are not listed
    save_adapter(pipe, adapters / "sks-star" / "checkpoint-10", "x")
    from diffusers import StableDiffusionPipeline

    import superlora_diffusers  # noqa: F401

    other = StableDiffusionPipeline(**tiny_components(0, cross_attention_dim=64))
    save_adapter(other, root / "uploads" / "other-base", "a photo of sks dog")
    (root / "uploads" / "notes.safetensors").write_text("this is not a safetensors file")
    from safetensors.torch import save_file

    save_file({"lora_unet_down.lora_down.weight": torch.zeros(2, 2)}, str(root / "uploads" / "kohya_lora.safetensors"))
    return {"root": root, "base": base, "adapters": adapters, "uploads": root / "uploads"}


@pytest.fixture(scope="module")
def server(world):
    port = free_port()
    log = open(world["root"] / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--base", str(world["base"]), "--adapters", str(world["adapters"]),
         "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                raise RuntimeError(f"the app did not start:\n{(world['root'] / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


@pytest.fixture
def app(client):
    """The client, with every adapter unloaded afterwards (tests share one server)."""
    yield client
    while client.predict(api_name="/adapter_info"):
        client.predict(*NO_SCALES, api_name="/remove_adapter")


def generate(client, prompt="a photo of sks star", seed=7, randomize=False, steps=3, size=16, n=1, scales=NO_SCALES):
    gallery, used = client.predict(prompt, "", seed, randomize, steps, 5.0, size, size, n, *scales, api_name="/generate")
    return [np.asarray(Image.open(item["image"]).convert("RGB"), dtype=np.int16) for item in gallery], used


def adapter_paths(client) -> dict[str, str]:
    return {label: path for label, path in client.predict(None, api_name="/refresh_adapters")["choices"]}


# ---- command line --------------------------------------------------------------------------------
def test_help_and_missing_base_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--base" in out.stdout and "--adapters" in out.stdout and "127.0.0.1" in out.stdout
    out = subprocess.run([sys.executable, "-m", "app", "--base", str(tmp_path / "nope"), "--port", str(free_port())],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot load base model" in out.stderr


# ---- generation ------------------------------------------------------------------------------------
def test_generate_is_seeded_and_shows_the_seed(app):
    images, used = generate(app, seed=7, n=2)
    assert used == 7 and len(images) == 2
    assert images[0].shape[0] >= 256  # 16x16 shown enlarged, pixel for pixel
    again, _ = generate(app, seed=7, n=1)
    assert np.array_equal(images[0], again[0])
    assert not np.array_equal(images[0], images[1])  # image i uses seed + i
    _, random_seed = generate(app, seed=7, randomize=True)
    assert isinstance(random_seed, int) and 0 <= random_seed < 2**31


@pytest.mark.parametrize("override, message", [
    ({"prompt": "  "}, "write a prompt"),
    ({"size": 20}, "multiple of 8"),
    ({"size": 4096}, "greater than maximum"),  # gradio's own bound on the slider
    ({"steps": 0}, "less than minimum"),
    ({"n": 100}, "greater than maximum"),
])
def test_bad_generation_requests_are_errors_and_the_app_keeps_running(app, override, message):
    with pytest.raises(AppError, match=message):
        generate(app, **override)
    images, _ = generate(app)
    assert len(images) == 1


# ---- adapters ----------------------------------------------------------------------------------------
def test_adapter_folder_is_listed_and_loaded_with_its_metadata(app):
    paths = adapter_paths(app)
    assert set(paths) == {"sks-star", "nested/polka"}  # checkpoints skipped
    base, _ = generate(app, seed=3)
    slots = app.predict(paths["sks-star"], *NO_SCALES, api_name="/load_adapter")
    assert slots[0]["label"].startswith("sks-star") and "trainable parameters" in slots[-1]
    (info,) = app.predict(api_name="/adapter_info")
    assert info["instance_prompt"] == "a photo of sks star"
    assert info["num_parameters"] > 0 and info["file_bytes"] > 0
    assert info["lora_rank1_ratio"] == pytest.approx(info["lora_rank1_parameters"] / info["num_parameters"])
    assert "tucker" in info["config"]
    adapted, _ = generate(app, seed=3)
    assert not np.array_equal(base[0], adapted[0])
    at_zero, _ = generate(app, seed=3, scales=(0.0, 1.0, 1.0, 1.0))
    assert np.array_equal(base[0], at_zero[0])  # scale 0 is the base model exactly

    # a second adapter at once, each with its own scale
    app.predict(paths["nested/polka"], *NO_SCALES, api_name="/load_adapter")
    assert [i["name"] for i in app.predict(api_name="/adapter_info")] == ["sks-star", "nested-polka"]
    only_first, _ = generate(app, seed=3, scales=(1.0, 0.0, 1.0, 1.0))
    assert np.array_equal(adapted[0], only_first[0])
    both, _ = generate(app, seed=3, scales=(1.0, 1.0, 1.0, 1.0))
    assert not np.array_equal(adapted[0], both[0])
    with pytest.raises(AppError, match="already loaded"):
        app.predict(paths["sks-star"], *NO_SCALES, api_name="/load_adapter")


def test_upload_adapter(app, world):
    slots = app.predict(handle_file(str(world["adapters"] / "sks-star" / "superlora_weights.safetensors")),
                        *NO_SCALES, api_name="/upload_adapter")
    assert "a photo of sks star" in slots[-1]


@pytest.mark.parametrize("name, message", [
    ("notes.safetensors", "not a readable safetensors file"),
    ("kohya_lora.safetensors", "is a LoRA, not a SuperLoRA"),
    ("other-base/superlora_weights.safetensors", "trained for another base model"),
])
def test_bad_upload_is_an_error_and_the_app_keeps_running(app, world, name, message):
    with pytest.raises(AppError, match=message):
        app.predict(handle_file(str(world["uploads"] / name)), *NO_SCALES, api_name="/upload_adapter")
    assert app.predict(api_name="/adapter_info") == []
    images, _ = generate(app)
    assert len(images) == 1


def test_upload_of_a_non_safetensors_file(app, world):
    with pytest.raises(AppError, match=r"\.safetensors"):  # gradio or the app refuses it
        app.predict(handle_file(str(STAR[0])), *NO_SCALES, api_name="/upload_adapter")


# ---- compare and sweep --------------------------------------------------------------------------------
def test_compare_and_sweep(app):
    with pytest.raises(AppError, match="load an adapter first"):
        app.predict("a photo of sks star", "", 5, False, 3, 5.0, 16, 16, *NO_SCALES, api_name="/compare")
    app.predict(adapter_paths(app)["sks-star"], *NO_SCALES, api_name="/load_adapter")
    sheet, used = app.predict("a photo of sks star", "", 5, False, 3, 5.0, 16, 16, *NO_SCALES, api_name="/compare")
    assert used == 5
    sheet = np.asarray(Image.open(sheet).convert("RGB"))
    cell = 256  # each 16x16 image enlarged to 256
    assert sheet.shape[1] >= 2 * cell and sheet.shape[0] >= cell
    base, _ = generate(app, seed=5, scales=(0.0, 1.0, 1.0, 1.0))
    adapted, _ = generate(app, seed=5)
    # the sheet's two panels are the base and the adapted image at the same seed
    def contains(im):
        for y in range(0, 40):
            for x in range(0, sheet.shape[1] - cell + 1):
                if (np.array_equal(sheet[y, x], im[0, 0]) and np.array_equal(sheet[y + cell - 1, x + cell - 1], im[-1, -1])
                        and np.array_equal(sheet[y:y + cell, x:x + cell].astype(np.int16), im)):
                    return True
        return False

    found = [contains(im[0]) for im in (base, adapted)]
    assert found == [True, True]

    grid, used = app.predict("a photo of sks star", "", 5, False, 3, 5.0, 16, 16, "0, 0.25, 0.5, 0.75, 1.0", 2,
                             *NO_SCALES, api_name="/sweep")
    grid = Image.open(grid)
    assert grid.width > 5 * 128 and grid.height > 2 * 128 and used == 5
    for bad, message in [("0, banana", "must be numbers"), ("0, 50", "must lie in"), (",".join(["1"] * 20), "at most")]:
        with pytest.raises(AppError, match=message):
            app.predict("a photo", "", 5, False, 3, 5.0, 16, 16, bad, 1, *NO_SCALES, api_name="/sweep")


# ---- training ----------------------------------------------------------------------------------------
def train(client, files, prompt="a photo of sks star", steps=3, budget=0, name="", preset="lorta"):
    return client.predict([handle_file(str(f)) for f in files], prompt, name, preset, budget, steps, 5e-3, 0, 1, 2,
                          api_name="/train")


def test_bad_training_input_is_an_error(app, tmp_path):
    with pytest.raises(AppError, match="upload 3 to 10 images"):
        train(app, STAR[:2])
    with pytest.raises(AppError, match="upload 3 to 10 images"):
        train(app, STAR * 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(AppError, match="cannot read image 'broken.png'"):
        train(app, [*STAR[:3], broken])
    with pytest.raises(AppError, match="instance prompt"):
        train(app, STAR[:3], prompt="")
    with pytest.raises(AppError, match="below the smallest SuperLoRA"):
        train(app, STAR[:3], budget=2)
    with pytest.raises(AppError, match="greater than maximum"):
        train(app, STAR[:3], steps=10**6)


def test_training_in_the_background_adds_an_adapter(app):
    before = set(adapter_paths(app))
    status = train(app, STAR[:3], name="app star", steps=3)
    assert "trainable parameters" in status
    with pytest.raises(AppError, match="already running"):
        train(app, STAR[:3], steps=3)
    generate(app)  # generation keeps answering while it trains
    deadline = time.time() + 120
    while (state := app.predict(api_name="/train_status"))["state"] in ("preparing", "training", "finishing"):
        assert time.time() < deadline, state
        time.sleep(0.5)
    assert state["state"] == "done", state
    assert state["step"] == state["max_steps"] == 3 and state["grid"].endswith("samples.png")
    new = set(adapter_paths(app)) - before
    assert len(new) == 1 and next(iter(new)).startswith("app-star-")
    app.predict(adapter_paths(app)[new.pop()], *NO_SCALES, api_name="/load_adapter")
    (info,) = app.predict(api_name="/adapter_info")
    assert info["instance_prompt"] == "a photo of sks star" and info["num_parameters"] == state["num_parameters"]


def test_stop_training(app):
    before = set(adapter_paths(app))
    train(app, STAR[:3], name="to stop", steps=500)
    assert "Stopping" in app.predict(api_name="/stop_training")
    deadline = time.time() + 60
    while (state := app.predict(api_name="/train_status"))["state"] in ("preparing", "training", "finishing"):
        assert time.time() < deadline, state
        time.sleep(0.3)
    assert state["state"] == "cancelled" and state["step"] < 500, state
    assert not Path(state["output_dir"]).exists()  # nothing half-made is left in the adapter folder
    assert set(adapter_paths(app)) == before
    with pytest.raises(AppError, match="no training is running"):
        app.predict(api_name="/stop_training")


# ---- a real browser -----------------------------------------------------------------------------------
def test_browser_types_a_prompt_clicks_generate_and_sees_images(server, tmp_path):
    if chromium_path() is None:
        pytest.skip("Debian's chromium is not installed (bash scripts/install_browser.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = launch_browser(pw)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            n = generate_in_browser(page, server, "a photo of sks star", timeout_ms=60_000, num_images=2)
            assert n == 2
            src = page.locator("#gallery img").first.get_attribute("src")
            assert src and ("/file=" in src or "/gradio_api/file" in src or src.startswith("data:"))
            assert page.locator("#seed-used input").input_value().isdigit()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
