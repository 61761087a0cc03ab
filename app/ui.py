"""The Gradio layout: components and events over `app.core.Studio`. Every handler turns a user mistake
into a `gr.Error` pop-up (the app keeps running); API names are stable for `gradio_client`:

/generate, /compare, /sweep, /refresh_adapters, /load_adapter, /upload_adapter, /remove_adapter,
/adapter_info, /train, /train_status, /stop_training.
"""

from __future__ import annotations

import functools
import logging
import os
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no usage pings unless asked for

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from superlora_diffusers import PRESETS, SuperLoRAFileError
from superlora_diffusers.dreambooth import TrainingError

from .core import (
    DISPLAY_MIN,
    MAX_ADAPTERS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_STEPS,
    MAX_SWEEP_ROWS,
    MAX_TRAIN_STEPS,
    SCALE_RANGE,
    TRAIN_IMAGES,
    Studio,
    UserError,
    enlarge,
    human_bytes,
    one_line,
)

logger = logging.getLogger("superlora.app")

CSS = """
.gallery img, #compare img, #sweep img, #train-grid img { image-rendering: pixelated; }
footer { display: none !important; }
"""


def shown_errors(fn):
    """Run a handler; user mistakes become a gr.Error pop-up with their one-line message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (UserError, SuperLoRAFileError, TrainingError) as e:
            raise gr.Error(one_line(e)) from None
        except Exception as e:  # noqa: BLE001 (a bug must not take the app down; log it, show one line)
            logger.error("%s failed:\n%s", fn.__name__, traceback.format_exc())
            raise gr.Error(f"{type(e).__name__}: {one_line(e)}") from None

    return wrapper


def progress_callback(progress: gr.Progress):
    return lambda done, total, what: progress((done, total), desc=what, unit="steps")


def info_markdown(studio: Studio) -> str:
    rows = studio.adapter_info()
    if not rows:
        return ("*No adapter loaded.* Pick one from the folder list and press **Load**, or upload a `.safetensors` "
                "SuperLoRA. Several can be active at once, each with its own scale.")
    blocks = []
    for i, r in enumerate(rows, 1):
        prompt = f" · instance prompt *{r['instance_prompt']}*" if r["instance_prompt"] else ""
        trained = f" · trained on `{r['base_model']}`" if r["base_model"] else ""
        blocks.append(
            f"**{i}. {r['name']}**{prompt}  \n"
            f"{r['config']} · {r['num_targets']} targets (`{r['target_modules']}`){trained}  \n"
            f"**{r['num_parameters']:,}** trainable parameters · file {human_bytes(r['file_bytes'])} · a rank-1 LoRA "
            f"of the same targets has {r['lora_rank1_parameters']:,} (**{r['lora_rank1_ratio']:,.0f}×** more)")
    return "\n\n".join(blocks)


def train_markdown(status: dict[str, Any] | None) -> str:
    if status is None:
        return "No training yet. One training runs at a time, in the background; generation keeps working."
    s = status
    head = {"preparing": "**Preparing**: loading the base model, encoding the images",
            "training": f"**Training**: step {s['step']}/{s['max_steps']}",
            "finishing": "**Finishing**: writing the adapter, its samples and model card",
            "done": f"**Done** in {s['elapsed_s']:.0f} s: **{s['name']}** is in the adapter list",
            "failed": f"**Failed**: {s['error']}",
            "cancelled": f"**Stopped** ({s['error']})"}[s["state"]]
    if s.get("stop_requested") and s["state"] in ("preparing", "training", "finishing"):
        head = f"**Stopping** after the current step ({s['step']}/{s['max_steps']})"
    loss = f" · loss {s['loss']:.4f}" if s["loss"] is not None else ""
    return (f"{head}{loss}\n\n`{s['name']}` · {s['config']} · **{s['num_parameters']:,}** trainable parameters · "
            f"prompt *{s['instance_prompt']}* · {s['elapsed_s']:.0f} s")


def progress_bar(status: dict[str, Any] | None) -> str:
    """An HTML bar that the training watcher redraws every second (visible to any page that asks)."""
    if status is None:
        return ""
    frac = 1.0 if status["state"] == "done" else status["step"] / max(1, status["max_steps"])
    color = {"failed": "#dc2626", "cancelled": "#6b7280"}.get(status["state"], "#f97316")
    label = f"{status['step']}/{status['max_steps']} steps"
    if status["state"] == "preparing":
        label = "preparing…"
    elif status["state"] == "finishing":
        label += " · final samples…"
    return (f'<div id="train-progress" style="display:flex;align-items:center;gap:10px">'
            f'<div style="flex:1;background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden">'
            f'<div style="width:{100 * frac:.1f}%;background:{color};height:100%"></div></div>'
            f'<span style="font-family:monospace;font-size:13px">{label}</span></div>')


def build_demo(studio: Studio) -> gr.Blocks:
    native, max_side, m = studio.native, studio.max_side, studio.size_multiple

    def slot_updates(scales: list[float] | None = None):
        scales = list(scales or [])
        rows, sliders = [], []
        for i in range(MAX_ADAPTERS):
            if i < len(studio.loaded):
                value = scales[i] if i < len(scales) and scales[i] is not None else 1.0
                rows.append(gr.Row(visible=True))
                sliders.append(gr.Slider(label=f"{studio.loaded[i].name} · scale", value=value))
            else:
                rows.append(gr.Row(visible=False))
                sliders.append(gr.Slider(label=f"slot {i + 1}", value=1.0))
        return [*rows, *sliders, info_markdown(studio)]

    def file_choices():
        return studio.list_adapter_files()

    with gr.Blocks(title="SuperLoRA studio") as demo:
        gr.Markdown(
            f"## SuperLoRA studio\nBase model **`{studio.base}`** ({native}×{native} native) · adapters from "
            f"`{studio.adapters_dir}` · one shared SuperLoRA tensor generates every attention ΔW."
        )
        with gr.Row(equal_height=False):
            # ---- left: prompt, settings, adapters ------------------------------------------------
            with gr.Column(scale=2, min_width=340):
                prompt = gr.Textbox(label="Prompt", value="", placeholder="a photo of sks star", elem_id="prompt", lines=2)
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=5.0, step=0.5, label="Guidance scale")
                with gr.Row():
                    width = gr.Slider(m, max_side, value=native, step=m, label="Width")
                    height = gr.Slider(m, max_side, value=native, step=m, label="Height")

                gr.Markdown("### Adapters")
                with gr.Row():
                    adapter_file = gr.Dropdown(choices=file_choices(), value=None, label="Trained adapters",
                                               scale=4, elem_id="adapter-file")
                    refresh = gr.Button("↻ Refresh", size="sm", scale=1, min_width=60)
                    load = gr.Button("Load", size="sm", variant="secondary", scale=1, min_width=60, elem_id="load")
                upload = gr.File(label="…or upload a SuperLoRA .safetensors", file_types=[".safetensors"],
                                 file_count="single", height=120, elem_id="upload")
                slot_rows, slot_scales, slot_remove = [], [], []
                lo, hi = SCALE_RANGE
                for i in range(MAX_ADAPTERS):
                    with gr.Row(visible=False, equal_height=True) as row:
                        scale = gr.Slider(lo, hi, value=1.0, step=0.05, label=f"slot {i + 1}", scale=5)
                        remove = gr.Button("✕", size="sm", scale=0, min_width=40)
                    slot_rows.append(row), slot_scales.append(scale), slot_remove.append(remove)
                adapter_md = gr.Markdown(info_markdown(studio), elem_id="adapter-info")

            # ---- right: tabs --------------------------------------------------------------------
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        with gr.Row():
                            num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images", scale=3)
                            go = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
                        gallery = gr.Gallery(label="Results", columns=4, height="auto", format="png",
                                             object_fit="contain", elem_id="gallery")
                        seed_used = gr.Number(label="Seed used (image i: seed + i)", precision=0, interactive=False,
                                              elem_id="seed-used")
                    with gr.Tab("Compare", id="compare-tab"):
                        gr.Markdown("The same seed and settings **without** and **with** the loaded adapters "
                                    "(at their slot scales).")
                        compare_btn = gr.Button("Compare without / with", variant="primary")
                        compare_img = gr.Image(label="Without | with", show_label=False, type="pil", format="png",
                                               elem_id="compare", interactive=False)
                        compare_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                        gr.Markdown("**Scale sweep**: one column per call-time scale (it multiplies the adapter mix), "
                                    "one row per seed.")
                        with gr.Row():
                            sweep_scales = gr.Textbox(value="0, 0.25, 0.5, 0.75, 1.0", label="Scales", scale=3)
                            sweep_rows = gr.Slider(1, MAX_SWEEP_ROWS, value=2, step=1, label="Rows (seeds)", scale=2)
                        sweep_btn = gr.Button("Scale sweep", variant="primary")
                        sweep_img = gr.Image(label="Scale sweep", show_label=False, type="pil", format="png",
                                             elem_id="sweep", interactive=False)
                    with gr.Tab("Train", id="train-tab"):
                        gr.Markdown(f"DreamBooth a new SuperLoRA on `{studio.base}` from {TRAIN_IMAGES[0]}-"
                                    f"{TRAIN_IMAGES[1]} photos of one subject, with the library's own training code. "
                                    "It runs in the background; when done the adapter appears in the list.")
                        train_files = gr.File(label=f"{TRAIN_IMAGES[0]}-{TRAIN_IMAGES[1]} images of the subject",
                                              file_count="multiple", file_types=["image"], height=120)
                        with gr.Row():
                            instance_prompt = gr.Textbox(label="Instance prompt", placeholder="a photo of sks star",
                                                         scale=3)
                            adapter_name = gr.Textbox(label="Adapter name (optional)", scale=2)
                        with gr.Row():
                            preset = gr.Dropdown(sorted(PRESETS), value="lorta", label="Preset")
                            budget = gr.Number(label="…or parameter budget (0 = use the preset)", value=0,
                                               precision=0, minimum=0)
                            train_steps = gr.Slider(1, MAX_TRAIN_STEPS, value=400, step=1, label="Steps")
                        with gr.Accordion("Advanced", open=False):
                            with gr.Row():
                                lr = gr.Number(label="Learning rate", value=5e-3)
                                train_seed = gr.Number(label="Seed", value=0, precision=0)
                                val_images = gr.Slider(1, 8, value=4, step=1, label="Validation images")
                                val_steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Validation inference steps")
                        with gr.Row():
                            train_btn = gr.Button("Train", variant="primary")
                            stop_btn = gr.Button("Stop", variant="stop")
                            status_btn = gr.Button("↻ Status")
                        train_bar = gr.HTML(progress_bar(studio.trainer.status()))
                        train_md = gr.Markdown(train_markdown(studio.trainer.status()), elem_id="train-status")
                        train_grid = gr.Image(label="Validation grid (latest)", type="pil", format="png",
                                              interactive=False, height=280, elem_id="train-grid")

        settings = [prompt, negative, seed, randomize, steps, guidance, width, height]
        slot_outputs = [*slot_rows, *slot_scales, adapter_md]

        # ---- generation (one queue: the pipeline runs one request at a time) -----------------------
        @shown_errors
        def generate(prompt, negative, seed, randomize, steps, guidance, width, height, num_images, *scales,
                     progress=gr.Progress()):
            images, used = studio.generate(prompt, negative, seed, randomize, steps, guidance, width, height,
                                           num_images, scales, progress_callback(progress))
            items = [(enlarge(im, DISPLAY_MIN), f"seed {used + i}") for i, im in enumerate(images)]
            return items, used

        go.click(generate, [*settings, num_images, *slot_scales], [gallery, seed_used], api_name="generate",
                 concurrency_id="pipe", concurrency_limit=1)
        prompt.submit(generate, [*settings, num_images, *slot_scales], [gallery, seed_used], api_name=False,
                      concurrency_id="pipe", concurrency_limit=1)

        @shown_errors
        def compare(prompt, negative, seed, randomize, steps, guidance, width, height, *scales, progress=gr.Progress()):
            base, adapted, used = studio.compare(prompt, negative, seed, randomize, steps, guidance, width, height,
                                                 scales, progress_callback(progress))
            return studio.compare_sheet(base, adapted, used), used

        compare_btn.click(compare, [*settings, *slot_scales], [compare_img, compare_seed], api_name="compare",
                          concurrency_id="pipe", concurrency_limit=1)

        @shown_errors
        def sweep(prompt, negative, seed, randomize, steps, guidance, width, height, scales_text, rows, *scales,
                  progress=gr.Progress()):
            sheet, used, _ = studio.sweep(prompt, negative, seed, randomize, steps, guidance, width, height,
                                          scales_text, rows, scales, progress_callback(progress))
            return sheet, used

        sweep_btn.click(sweep, [*settings, sweep_scales, sweep_rows, *slot_scales], [sweep_img, compare_seed],
                        api_name="sweep", concurrency_id="pipe", concurrency_limit=1)

        # ---- adapters --------------------------------------------------------------------------------
        @shown_errors
        def refresh_adapters(current=None):
            choices = file_choices()
            keep = current if current in [p for _, p in choices] else None
            return gr.Dropdown(choices=choices, value=keep)

        refresh.click(refresh_adapters, [adapter_file], [adapter_file], api_name="refresh_adapters")

        @shown_errors
        def load_adapter(path, *scales):
            label = next((lbl for lbl, p in file_choices() if p == path), None)
            studio.load_adapter(path, label)
            return slot_updates(list(scales[:len(studio.loaded) - 1]) + [1.0])

        load.click(load_adapter, [adapter_file, *slot_scales], slot_outputs, api_name="load_adapter",
                   concurrency_id="pipe", concurrency_limit=1)

        @shown_errors
        def upload_adapter(file, *scales):
            if not file:
                return slot_updates(list(scales))
            path = Path(file if isinstance(file, str) else file.name)
            studio.load_adapter(path, path.name)
            return slot_updates(list(scales[:len(studio.loaded) - 1]) + [1.0])

        upload.upload(upload_adapter, [upload, *slot_scales], slot_outputs, api_name="upload_adapter",
                      concurrency_id="pipe", concurrency_limit=1)

        for i, remove in enumerate(slot_remove):
            def remove_adapter(*scales, index=i):
                studio.unload_adapter(index)
                return slot_updates([s for j, s in enumerate(scales) if j != index])

            remove.click(shown_errors(remove_adapter), slot_scales, slot_outputs,
                         api_name="remove_adapter" if i == 0 else False, concurrency_id="pipe", concurrency_limit=1)

        def adapter_info() -> list[dict]:
            """Each loaded adapter: name, instance prompt, config, trainable parameters, file size, rank-1 LoRA ratio."""
            return studio.adapter_info()

        gr.api(adapter_info, api_name="adapter_info")

        # ---- training --------------------------------------------------------------------------------
        @shown_errors
        def start_training(files, instance_prompt, name, preset, budget, train_steps, lr, train_seed, val_images,
                           val_steps):
            paths = [f if isinstance(f, str) else f.name for f in (files or [])]
            studio.trainer.start(paths, instance_prompt, preset, budget, train_steps, name or "", lr, train_seed,
                                 val_images, val_steps)
            return train_markdown(studio.trainer.status())

        def grid_image(status):
            path = (status or {}).get("grid")
            if not path:
                return None
            try:
                with Image.open(path) as im:
                    return enlarge(im.convert("RGB"), 128)
            except OSError:  # being written right now: show it next time
                return gr.Image()

        def train_status():
            status = studio.trainer.status()
            return progress_bar(status), train_markdown(status), grid_image(status)

        def watch_training(current):
            import time

            while True:
                status = studio.trainer.status()
                if status is None or status["state"] not in ("preparing", "training", "finishing"):
                    break
                yield progress_bar(status), train_markdown(status), grid_image(status), gr.Dropdown()
                time.sleep(1.0)
            choices = file_choices()
            new = (status or {}).get("weights") or current
            new = new if new in [p for _, p in choices] else current
            yield progress_bar(status), train_markdown(status), grid_image(status), gr.Dropdown(choices=choices, value=new)

        train_btn.click(
            start_training, [train_files, instance_prompt, adapter_name, preset, budget, train_steps, lr, train_seed,
                             val_images, val_steps], [train_md], api_name="train",
            concurrency_id="train", concurrency_limit=1,
        ).success(watch_training, [adapter_file], [train_bar, train_md, train_grid, adapter_file], api_name=False,
                  concurrency_limit=None, show_progress="hidden")

        def train_status_api() -> dict:
            """The current (or last) training: state, step, max_steps, loss, error, weights, grid..."""
            return studio.trainer.status() or {}

        gr.api(train_status_api, api_name="train_status")
        status_btn.click(train_status, None, [train_bar, train_md, train_grid], api_name=False, concurrency_limit=None)

        @shown_errors
        def stop_training():
            studio.trainer.cancel()
            return train_markdown(studio.trainer.status())

        stop_btn.click(stop_training, None, [train_md], api_name="stop_training", concurrency_limit=None)

        demo.load(lambda: (gr.Dropdown(choices=file_choices()), *train_status(), *slot_updates()), None,
                  [adapter_file, train_bar, train_md, train_grid, *slot_outputs], api_name=False)
    return demo


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True, **kwargs):
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, css=CSS, show_error=True, **kwargs)
    return demo
