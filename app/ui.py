"""The Gradio layout: components and events over `app.core.Studio`.

Two kinds of events. The page's own adapter actions (Load, upload, ✕, a finished training) never raise: a
user mistake becomes a notice and a line in the adapter panel's message, because Gradio marks every output
of a raising event with an "Error" badge that would cover the sliders and ✕ buttons. API endpoints (named
parameters and outputs, listed by `gradio_client.Client.view_api()`) raise the one-line message, so clients
get it as an error:

/generate, /compare, /sweep, /xy_grid, /refresh_adapters, /load_adapter, /upload_adapter, /remove_adapter,
/adapter_info, /adapter_cards, /delete_adapter, /train, /train_status, /stop_training.

The gr.api endpoints' type hints are their API schema (the returned dicts are core's TypedDicts), so this
module does not postpone annotations: `from __future__ import annotations` would leave gr.api a string for
the return type, which view_api() shows as Any.

Ordinary user mistakes are logged as one line; only unexpected exceptions get a traceback.
"""

import functools
import logging
import os
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no usage pings unless asked for

import gradio as gr  # noqa: E402

from superlora_diffusers import PRESETS, SuperLoRAFileError
from superlora_diffusers.training import TrainingError

from .core import (
    DEFAULT_SAMPLER,
    DISPLAY_MIN,
    MAX_ADAPTERS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_STEPS,
    MAX_SWEEP_ROWS,
    MAX_XY,
    MAX_TRAIN_STEPS,
    SAMPLERS,
    XY_AXES,
    SCALE_RANGE,
    SUPERLORA,
    TRAIN_IMAGES,
    AdapterCard,
    AdapterRow,
    Studio,
    TrainStatus,
    UserError,
    MAX_CLASS_IMAGES,
    enlarge,
    example_subjects,
    human_bytes,
    insert_trigger,
    one_line,
    read_png_settings,
)

logger = logging.getLogger("superlora.app")
USER_ERRORS = (UserError, SuperLoRAFileError, TrainingError)

CSS = """
.gallery img, #compare img, #sweep img, #train-grid img { image-rendering: pixelated; }
footer { display: none !important; }
"""


def message_of(where: str, e: BaseException) -> str:
    """The one line shown for a failed action; a user mistake is logged as one line, a bug with its traceback."""
    if isinstance(e, USER_ERRORS):
        logger.info("%s refused: %s", where, one_line(e))
        return one_line(e)
    logger.error("%s failed:\n%s", where, traceback.format_exc())
    return f"{type(e).__name__}: {one_line(e)}"


def api_errors(fn: Callable) -> Callable:
    """For endpoints: a failure is raised as one gr.Error line (no traceback printed by Gradio)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 (a bug must not take the app down; log it, show one line)
            raise gr.Error(message_of(fn.__name__, e), print_exception=False) from None

    return wrapper


def notice(where: str, e: BaseException) -> str:
    """For the page's own adapter actions: a pop-up notice and the panel's message instead of an exception."""
    text = message_of(where, e)
    gr.Warning(text)
    return f"⚠️ {text}"


def progress_callback(progress: gr.Progress):
    return lambda done, total, what: progress((done, total), desc=what, unit="steps")


def info_markdown(studio: Studio) -> str:
    rows = studio.adapter_info()
    if not rows:
        return ("*No adapter loaded.* Pick one from the folder list and press **Load**, or upload a `.safetensors` "
                "SuperLoRA or LoRA. Several can be active at once, each with its own UNet and text-encoder strength.")
    blocks = []
    for i, r in enumerate(rows, 1):
        trigger = f" · trigger *{r['trigger']}*" if r["trigger"] else ""
        trained = f" · trained on `{r['base_model']}`" if r["base_model"] else ""
        versus = (f" · a rank-1 LoRA of the same targets has {r['lora_rank1_parameters']:,} ({r['versus_lora1']})"
                  if r["lora_rank1_parameters"] else "")
        blocks.append(
            f"**{i}. {r['name']}** · {r['kind']}{trigger}  \n"
            f"{r['config']} · {r['num_targets']} targets (`{r['target_modules']}`){trained}  \n"
            f"**{r['num_parameters']:,}** trainable parameters · file {human_bytes(r['file_bytes'])}{versus}")
    return "\n\n".join(blocks)


def card_markdown(card: dict[str, Any] | None) -> str:
    if card is None:
        return "*Pick a card to see its details, load, download or delete it.*"
    trigger = f"trigger *{card['trigger']}*" if card["trigger"] else "no trigger words recorded"
    base = f"trained on `{card['base_model']}`" if card["base_model"] else "base model not recorded"
    loaded = " · **loaded**" if card["loaded"] else ""
    return (f"**{card['label']}** · {card['kind']}{loaded}  \n{trigger} · {base}  \n"
            f"**{card['num_parameters']:,}** trainable parameters · file {human_bytes(card['file_bytes'])}  \n"
            f"`{card['file']}`")


def card_items(cards: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    """Gallery items: each card's preview (the run's samples.png) or a plain tile, captioned."""
    from PIL import Image, ImageDraw

    items = []
    for c in cards:
        if c["preview"]:
            image: Any = c["preview"]
        else:
            image = Image.new("RGB", (256, 256), "#e5e7eb")
            ImageDraw.Draw(image).text((86, 120), "no preview", fill="#6b7280")
        items.append((image, f"{c['label']} · {c['kind']} · {c['num_parameters']:,} params · "
                             f"{human_bytes(c['file_bytes'])}"))
    return items


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
    lo, hi = SCALE_RANGE

    def slot_updates(unet: list | None = None, text: list | None = None) -> list:
        """Rows, UNet and text-encoder sliders and the info panel for the loaded adapters (kept values, new 1.0)."""
        unet, text = list(unet or []), list(text or [])
        rows, unet_sliders, text_sliders = [], [], []
        for i in range(MAX_ADAPTERS):
            if i < len(studio.loaded):
                a = studio.loaded[i]
                name = a.name if a.kind == SUPERLORA else f"{a.name} ({a.kind})"
                u = unet[i] if i < len(unet) and unet[i] is not None else 1.0
                t = text[i] if i < len(text) and text[i] is not None else 1.0
                rows.append(gr.Row(visible=True))
                unet_sliders.append(gr.Slider(label=f"{name} · UNet strength", value=u))
                text_sliders.append(gr.Slider(label="text-encoder strength", value=t))
            else:
                rows.append(gr.Row(visible=False))
                unet_sliders.append(gr.Slider(label=f"slot {i + 1} · UNet strength", value=1.0))
                text_sliders.append(gr.Slider(label=f"slot {i + 1} · text-encoder strength", value=1.0))
        return [*rows, *unet_sliders, *text_sliders, info_markdown(studio)]

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
                prompt = gr.Textbox(label="Prompt", value="", placeholder="a photo of sks star <superlora:name:0.8>",
                                    elem_id="prompt", lines=2)
                negative = gr.Textbox(label="Negative prompt", value="", elem_id="negative")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                    sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="sampler")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Sampling steps", elem_id="steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=5.0, step=0.5, label="Guidance scale",
                                         elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(m, max_side, value=native, step=m, label="Width")
                    height = gr.Slider(m, max_side, value=native, step=m, label="Height")
                png_drop = gr.File(label="Drop a PNG made here to reuse its settings", file_types=[".png"],
                                   file_count="single", height=120, elem_id="png-drop")

                gr.Markdown("### Adapters")
                with gr.Row():
                    adapter_file = gr.Dropdown(choices=file_choices(), value=None, label="Trained adapters",
                                               scale=4, elem_id="adapter-file")
                    refresh = gr.Button("↻ Refresh", size="sm", scale=1, min_width=60)
                    load = gr.Button("Load", size="sm", variant="secondary", scale=1, min_width=60, elem_id="load")
                add_trigger = gr.Checkbox(label="Add the adapter's trigger words to the prompt when loading it",
                                          value=True, elem_id="add-trigger")
                upload = gr.File(label="…or upload a SuperLoRA or LoRA (diffusers/peft, kohya) .safetensors",
                                 file_types=[".safetensors"], file_count="single", height=120, elem_id="upload")
                slot_rows, slot_unet, slot_text, slot_remove = [], [], [], []
                for i in range(MAX_ADAPTERS):
                    with gr.Row(visible=False, equal_height=True, elem_id=f"slot-{i + 1}") as row:
                        unet_scale = gr.Slider(lo, hi, value=1.0, step=0.05, label=f"slot {i + 1} · UNet strength",
                                               scale=3)
                        text_scale = gr.Slider(lo, hi, value=1.0, step=0.05,
                                               label=f"slot {i + 1} · text-encoder strength", scale=2)
                        remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_id=f"remove-{i + 1}")
                    slot_rows.append(row), slot_unet.append(unet_scale), slot_text.append(text_scale)
                    slot_remove.append(remove)
                adapter_msg = gr.Markdown("", label="message", elem_id="adapter-msg")
                adapter_md = gr.Markdown(info_markdown(studio), label="adapters", elem_id="adapter-info")

            # ---- right: tabs --------------------------------------------------------------------
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        with gr.Row():
                            num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images", scale=3)
                            go = gr.Button("Generate", variant="primary", scale=1, elem_id="generate")
                        gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png",
                                             object_fit="contain", elem_id="gallery")
                        seed_used = gr.Number(label="Seed used", info="image i uses seed + i", value=None, precision=0,
                                              interactive=False, visible=False, elem_id="seed-used")
                    with gr.Tab("Library", id="library-tab") as library_tab:
                        lib_search = gr.Textbox(label="Search adapters", placeholder="name, trigger words or base model",
                                                elem_id="lib-search")
                        lib_gallery = gr.Gallery(label="Adapter cards", columns=4, height="auto", allow_preview=False,
                                                 object_fit="contain", elem_id="lib-gallery")
                        lib_details = gr.Markdown(card_markdown(None), label="adapter card", elem_id="lib-details")
                        with gr.Row():
                            lib_load = gr.Button("Load", variant="primary", elem_id="lib-load")
                            lib_download = gr.DownloadButton("Download", value=None, interactive=False,
                                                             elem_id="lib-download")
                            lib_delete = gr.Button("Delete", variant="stop", elem_id="lib-delete")
                    with gr.Tab("Compare", id="compare-tab"):
                        gr.Markdown("The same seed and settings **without** and **with** the loaded adapters "
                                    "(at their slot strengths).")
                        compare_btn = gr.Button("Compare without / with", variant="primary", elem_id="compare-btn")
                        compare_img = gr.Image(label="Comparison", show_label=False, type="pil", format="png",
                                               elem_id="compare", interactive=False)
                        compare_seed = gr.Number(label="Compare seed used", value=None, precision=0,
                                                 interactive=False, visible=False, elem_id="compare-seed")
                        gr.Markdown("**Scale sweep**: one column per call-time scale (it multiplies the adapter mix), "
                                    "one row per seed.")
                        with gr.Row():
                            sweep_scales = gr.Textbox(value="0, 0.25, 0.5, 0.75, 1.0", label="Scales", scale=3)
                            sweep_rows = gr.Slider(1, MAX_SWEEP_ROWS, value=2, step=1, label="Rows (seeds)", scale=2)
                        sweep_btn = gr.Button("Scale sweep", variant="primary", elem_id="sweep-btn")
                        sweep_img = gr.Image(label="Scale sweep", show_label=False, type="pil", format="png",
                                             elem_id="sweep", interactive=False)
                        sweep_seed = gr.Number(label="Sweep seed used", info="row i uses seed + i", value=None, precision=0,
                                               interactive=False, visible=False, elem_id="sweep-seed")
                        gr.Markdown("**X/Y grid**: any two of scale, seed, steps, guidance and sampler, comma-separated "
                                    f"values (at most {MAX_XY} each); everything else as set on the left.")
                        with gr.Row():
                            x_axis = gr.Dropdown(list(XY_AXES), value="scale", label="X axis", scale=1)
                            x_values = gr.Textbox("0, 0.5, 1", label="X values", scale=2)
                            y_axis = gr.Dropdown(list(XY_AXES), value="sampler", label="Y axis", scale=1)
                            y_values = gr.Textbox(", ".join(SAMPLERS), label="Y values", scale=2)
                        xy_btn = gr.Button("X/Y grid", variant="primary", elem_id="xy-btn")
                        xy_img = gr.Image(label="X/Y grid", show_label=False, type="pil", format="png",
                                          elem_id="xy", interactive=False)
                        xy_seed = gr.Number(label="X/Y seed used", value=None, precision=0, interactive=False,
                                            visible=False, elem_id="xy-seed")
                    with gr.Tab("Train", id="train-tab"):
                        gr.Markdown(f"DreamBooth a new SuperLoRA on `{studio.base}` from {TRAIN_IMAGES[0]}-"
                                    f"{TRAIN_IMAGES[1]} photos of one subject, with the library's own training code. "
                                    "It runs in the background; when done the adapter is loaded, ready to use.")
                        subjects = example_subjects()
                        example = gr.Dropdown(["(my own images)", *subjects], value="(my own images)",
                                              label="Subject: a bundled example or your own images", elem_id="example")
                        train_files = gr.File(label=f"{TRAIN_IMAGES[0]}-{TRAIN_IMAGES[1]} images of the subject",
                                              file_count="multiple", file_types=["image"], height=120, elem_id="train-files")
                        with gr.Row():
                            instance_prompt = gr.Textbox(label="Instance prompt", placeholder="a photo of sks star",
                                                         scale=3)
                            adapter_name = gr.Textbox(label="Adapter name (optional)", scale=2)
                        with gr.Row():
                            preset = gr.Dropdown(sorted(PRESETS), value="lorta", label="Preset")
                            budget = gr.Number(label="…or parameter budget (0 = use the preset)", value=0,
                                               precision=0, minimum=0)
                            train_steps = gr.Slider(1, MAX_TRAIN_STEPS, value=400, step=1, label="Training steps",
                                                    elem_id="train-steps")
                        with gr.Row():
                            prior = gr.Checkbox(label="Prior preservation", value=False, elem_id="prior")
                            class_prompt = gr.Textbox("", label="Class prompt", placeholder="a photo of a star", scale=3)
                            num_class = gr.Slider(1, MAX_CLASS_IMAGES, value=25, step=1, label="Class images")
                        with gr.Accordion("Advanced", open=False):
                            with gr.Row():
                                lr = gr.Number(label="Learning rate", value=5e-3)
                                train_seed = gr.Number(label="Training seed", value=0, precision=0)
                                val_images = gr.Slider(1, 8, value=4, step=1, label="Validation images")
                                val_steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Validation sampling steps")
                        with gr.Row():
                            train_btn = gr.Button("Train", variant="primary", elem_id="train-btn")
                            stop_btn = gr.Button("Stop", variant="stop")
                            status_btn = gr.Button("↻ Status")
                        train_bar = gr.HTML(progress_bar(studio.trainer.status()), label="progress")
                        train_md = gr.Markdown(train_markdown(studio.trainer.status()), label="training status",
                                               elem_id="train-status")
                        train_grid = gr.Image(label="Validation grid (latest)", type="pil", format="png",
                                              interactive=False, height=280, elem_id="train-grid")
                        with gr.Accordion("Model card", open=False):
                            train_card = gr.Markdown("", label="model card", elem_id="train-card")

            # hidden components for /upload_adapter: a file reaches the app only through gr.File's upload
            api_file = gr.File(label="file", visible=False, file_types=[".safetensors"])
            api_adapters = gr.JSON(label="adapters", visible=False)
            # the library's state in hidden components: a gr.State makes Gradio hold a heartbeat connection open,
            # so the page never goes network-idle, which browser automation (and app/screenshot.py) waits for
            lib_cards = gr.JSON([], visible=False)
            lib_selected = gr.Textbox(None, visible=False)
            lib_armed = gr.Checkbox(False, visible=False)

        settings = [prompt, negative, seed, randomize, steps, guidance, width, height, sampler]
        slot_scales = [*slot_unet, *slot_text]
        slot_outputs = [*slot_rows, *slot_unet, *slot_text, adapter_md]
        keep_slots = [gr.skip()] * len(slot_outputs)
        pipe_queue = dict(concurrency_id="pipe", concurrency_limit=1)
        private = dict(api_visibility="private")

        # ---- generation (one queue: the pipeline runs one request at a time) -----------------------
        @api_errors
        def generate(prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, width, height, sampler,
                     num_images, scale_1, scale_2, scale_3, scale_4, text_scale_1, text_scale_2, text_scale_3,
                     text_scale_4, progress=gr.Progress()):
            """Images for the prompt with the loaded adapters at these strengths; image i uses seed + i."""
            images, used = studio.generate(
                prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, width, height, num_images,
                [scale_1, scale_2, scale_3, scale_4], progress_callback(progress), sampler,
                [text_scale_1, text_scale_2, text_scale_3, text_scale_4])
            items = [(enlarge(im, DISPLAY_MIN), f"seed {used + i}") for i, im in enumerate(images)]
            return items, used

        def reveal():
            """Seed boxes stay hidden until their first result, so none shows a seed that was not used."""
            return gr.Number(visible=True)

        go.click(generate, [*settings, num_images, *slot_scales], [gallery, seed_used], api_name="generate",
                 **pipe_queue).success(reveal, None, [seed_used], **private)
        prompt.submit(generate, [*settings, num_images, *slot_scales], [gallery, seed_used], **private,
                      **pipe_queue).success(reveal, None, [seed_used], **private)

        @api_errors
        def compare(prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, width, height, sampler,
                    scale_1, scale_2, scale_3, scale_4, text_scale_1, text_scale_2, text_scale_3, text_scale_4,
                    progress=gr.Progress()):
            """The same seed without and with the loaded adapters, side by side."""
            base, adapted, used = studio.compare(
                prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, width, height,
                [scale_1, scale_2, scale_3, scale_4], progress_callback(progress), sampler,
                [text_scale_1, text_scale_2, text_scale_3, text_scale_4])
            return studio.compare_sheet(base, adapted, used), used

        compare_btn.click(compare, [*settings, *slot_scales], [compare_img, compare_seed], api_name="compare",
                          **pipe_queue).success(reveal, None, [compare_seed], **private)

        @api_errors
        def sweep(prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, width, height, sampler,
                  sweep_scales, rows, scale_1, scale_2, scale_3, scale_4, text_scale_1, text_scale_2, text_scale_3,
                  text_scale_4, progress=gr.Progress()):
            """A grid: one column per call-time scale, one row per seed."""
            sheet, used, _ = studio.sweep(
                prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, width, height, sweep_scales,
                rows, [scale_1, scale_2, scale_3, scale_4], progress_callback(progress), sampler,
                [text_scale_1, text_scale_2, text_scale_3, text_scale_4])
            return sheet, used

        sweep_btn.click(sweep, [*settings, sweep_scales, sweep_rows, *slot_scales], [sweep_img, sweep_seed],
                        api_name="sweep", **pipe_queue).success(reveal, None, [sweep_seed], **private)

        @api_errors
        def xy_grid(prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, width, height, sampler,
                    x_axis, x_values, y_axis, y_values, scale_1, scale_2, scale_3, scale_4, text_scale_1,
                    text_scale_2, text_scale_3, text_scale_4, progress=gr.Progress()):
            """A labelled grid over two of scale, seed, steps, guidance and sampler."""
            return studio.xy_grid(prompt, negative_prompt, seed, randomize_seed, steps, guidance_scale, width, height,
                                  sampler, x_axis, x_values, y_axis, y_values, [scale_1, scale_2, scale_3, scale_4],
                                  [text_scale_1, text_scale_2, text_scale_3, text_scale_4], progress_callback(progress))

        xy_btn.click(xy_grid, [*settings, x_axis, x_values, y_axis, y_values, *slot_scales], [xy_img, xy_seed],
                     api_name="xy_grid", **pipe_queue).success(reveal, None, [xy_seed], **private)

        def read_png(file, *scales):
            """Fill the settings from a PNG this app wrote (its text chunks); loaded adapters get their strengths."""
            keep = [gr.skip()] * (len(settings) + len(slot_scales))
            if not file:
                return [*keep, gr.skip(), gr.skip()]
            try:
                s = read_png_settings(file if isinstance(file, str) else file.name)
            except Exception as e:  # noqa: BLE001
                return [*keep, notice("read_png", e), None]
            names = [a.name for a in studio.loaded]
            unet, text = list(scales[:MAX_ADAPTERS]), list(scales[MAX_ADAPTERS:])
            missing = []
            for a in s.get("adapters", []):
                if a["name"] in names:
                    unet[names.index(a["name"])], text[names.index(a["name"])] = a["unet"], a["text_encoder"]
                else:
                    missing.append(a["name"])
            values = [s["prompt"], s.get("negative_prompt", ""), s.get("seed", 0), False, s.get("steps", 20),
                      s.get("guidance_scale", 5.0), s.get("width", native), s.get("height", native),
                      s.get("sampler", DEFAULT_SAMPLER)]
            note = f"Settings read from the PNG (seed {s.get('seed')})."
            if missing:
                note += f" It used adapter(s) {', '.join(missing)}, not loaded now: load them for the same image."
            return [*values, *unet, *text, note, None]

        png_drop.upload(read_png, [png_drop, *slot_scales], [*settings, *slot_scales, adapter_msg, png_drop],
                        **private)

        # ---- adapters: the page's events (never raise) -----------------------------------------------
        def after_load(name: str, prompt_now: str, add: bool, scales: tuple) -> list:
            row = next(r for r in studio.adapter_info() if r["name"] == name)
            new_prompt = insert_trigger(prompt_now, row["instance_prompt"]) if add else prompt_now
            n = len(studio.loaded)
            unet, text = list(scales[:MAX_ADAPTERS])[:n - 1], list(scales[MAX_ADAPTERS:])[:n - 1]
            return [*slot_updates(unet, text), f"Loaded **{name}**.", new_prompt]

        def load_selected(path, prompt_now, add, *scales):
            try:
                name = studio.load_adapter(*studio.resolve_adapter(path))
            except Exception as e:  # noqa: BLE001 (shown as a notice: the panel stays usable)
                return [*keep_slots, notice("load_adapter", e), gr.skip()]
            return after_load(name, prompt_now, add, scales)

        load.click(load_selected, [adapter_file, prompt, add_trigger, *slot_scales],
                   [*slot_outputs, adapter_msg, prompt], **private, **pipe_queue)

        def upload_selected(file, prompt_now, add, *scales):
            if not file:
                return [*keep_slots, gr.skip(), gr.skip(), gr.skip()]
            path = Path(file if isinstance(file, str) else file.name)
            try:
                name = studio.load_adapter(path, path.name)
            except Exception as e:  # noqa: BLE001
                return [*keep_slots, notice("upload_adapter", e), gr.skip(), None]
            return [*after_load(name, prompt_now, add, scales), None]  # None: the box is empty for the next file

        upload.upload(upload_selected, [upload, prompt, add_trigger, *slot_scales],
                      [*slot_outputs, adapter_msg, prompt, upload], **private, **pipe_queue)

        for i, remove in enumerate(slot_remove):
            def remove_slot(*scales, index=i):
                try:
                    name = studio.unload_adapter(index)
                except Exception as e:  # noqa: BLE001
                    return [*keep_slots, notice("remove_adapter", e)]
                unet = [s for j, s in enumerate(scales[:MAX_ADAPTERS]) if j != index]
                text = [s for j, s in enumerate(scales[MAX_ADAPTERS:]) if j != index]
                return [*slot_updates(unet, text), f"Removed **{name}**."]

            remove.click(remove_slot, slot_scales, [*slot_outputs, adapter_msg], **private, **pipe_queue)

        def refresh_list(current: str | None) -> gr.Dropdown:
            """Rescan the adapter folder; the picked adapter stays picked while it is still there."""
            choices = file_choices()
            return gr.Dropdown(choices=choices, value=current if current in [p for _, p in choices] else None)

        refresh.click(refresh_list, [adapter_file], [adapter_file], **private)

        # ---- adapters: API endpoints (raise on a mistake; the page does not listen to them) -------------
        @api_errors
        def refresh_adapters() -> list[list[str]]:
            """Rescan the adapter folder: [label, path] of every SuperLoRA or LoRA file in it."""
            return [[label, path] for label, path in file_choices()]

        gr.api(refresh_adapters, api_name="refresh_adapters")

        @api_errors
        def load_adapter(path: str) -> list[AdapterRow]:
            """Load an adapter by its folder-list label or its path inside the adapter folder (a training that just
            finished included); returns every loaded adapter's information."""
            studio.load_adapter(*studio.resolve_adapter(path))
            return studio.adapter_info()

        gr.api(load_adapter, api_name="load_adapter", **pipe_queue)

        @api_errors
        def upload_adapter(file) -> list[AdapterRow]:
            """Load an uploaded SuperLoRA or LoRA .safetensors file; returns every loaded adapter's information."""
            if not file:
                raise UserError("upload a SuperLoRA or LoRA .safetensors file")
            path = Path(file if isinstance(file, str) else file.name)
            studio.load_adapter(path, path.name)
            return studio.adapter_info()

        api_file.upload(upload_adapter, [api_file], [api_adapters], api_name="upload_adapter", **pipe_queue)

        @api_errors
        def remove_adapter(name: str) -> list[AdapterRow]:
            """Unload the loaded adapter of this name (or slot number 1-4); returns the adapters left."""
            names = [a.name for a in studio.loaded]
            if str(name).strip().isdigit():
                studio.unload_adapter(int(name) - 1)
            elif name in names:
                studio.unload_adapter(names.index(name))
            else:
                raise UserError(f"no loaded adapter named {name!r}; loaded: {', '.join(names) or 'none'}")
            return studio.adapter_info()

        gr.api(remove_adapter, api_name="remove_adapter", **pipe_queue)

        def adapter_info() -> list[AdapterRow]:
            """Each loaded adapter: name, kind (SuperLoRA or LoRA), trigger words, config, trainable parameters, file
            size, rank-1 LoRA ratio (SuperLoRAs)."""
            return studio.adapter_info()

        gr.api(adapter_info, api_name="adapter_info")

        # ---- the library: adapter cards ----------------------------------------------------------------
        def show_cards(query):
            cards = studio.adapter_cards(query)
            return card_items(cards), cards, None, card_markdown(None), gr.DownloadButton(value=None, interactive=False), \
                gr.Button("Delete"), False

        card_outputs = [lib_gallery, lib_cards, lib_selected, lib_details, lib_download, lib_delete, lib_armed]
        lib_search.change(show_cards, [lib_search], card_outputs, **private)
        library_tab.select(show_cards, [lib_search], card_outputs, **private)  # new runs, loaded flags

        def pick_card(cards, evt: gr.SelectData):
            card = cards[evt.index] if cards and 0 <= evt.index < len(cards) else None
            if card is None:
                return None, card_markdown(None), gr.skip(), gr.Button("Delete"), False
            return (card["file"], card_markdown(card), gr.DownloadButton(value=card["file"], interactive=True),
                    gr.Button("Delete"), False)

        lib_gallery.select(pick_card, [lib_cards], [lib_selected, lib_details, lib_download, lib_delete, lib_armed],
                           **private)
        lib_load.click(load_selected, [lib_selected, prompt, add_trigger, *slot_scales],
                       [*slot_outputs, adapter_msg, prompt], **private, **pipe_queue)

        def delete_card(path, armed, query):
            """Two clicks: the first asks, the second deletes the file (and its run folder)."""
            if not path:
                return [*[gr.skip()] * len(card_outputs), notice("delete_adapter", UserError("pick a card first"))]
            if not armed:
                return [*[gr.skip()] * 5, gr.Button(f"Click again to delete {Path(path).parent.name}"), True,
                        gr.skip()]
            try:
                label = studio.delete_adapter_file(path)
            except Exception as e:  # noqa: BLE001
                return [*[gr.skip()] * 5, gr.Button("Delete"), False, notice("delete_adapter", e)]
            return [*show_cards(query), f"Deleted **{label}** from the adapter folder."]

        lib_delete.click(delete_card, [lib_selected, lib_armed, lib_search], [*card_outputs, adapter_msg], **private)

        @api_errors
        def adapter_cards(query: str = "") -> list[AdapterCard]:
            """Every adapter in the folder (filtered by `query`): label, path, preview, trigger words, parameters,
            bytes, base model, loaded."""
            return studio.adapter_cards(query)

        gr.api(adapter_cards, api_name="adapter_cards")

        @api_errors
        def delete_adapter(path: str) -> list[AdapterCard]:
            """Delete an adapter (folder-list label or path) from the adapter folder; returns the cards left."""
            studio.delete_adapter_file(path)
            return studio.adapter_cards()

        gr.api(delete_adapter, api_name="delete_adapter")

        # ---- training --------------------------------------------------------------------------------
        @api_errors
        def train(images, instance_prompt, adapter_name, preset, param_budget, training_steps, learning_rate, seed,
                  validation_images, validation_steps, example="", prior_preservation=False, class_prompt="",
                  num_class_images=25):
            """Start a DreamBooth training in the background (a bundled `example` subject replaces `images`);
            poll /train_status."""
            paths = [f if isinstance(f, str) else f.name for f in (images or [])]
            studio.trainer.start(paths, instance_prompt, preset, param_budget, training_steps, adapter_name or "",
                                 learning_rate, seed, validation_images, validation_steps,
                                 "" if example in ("", None, "(my own images)") else example, prior_preservation, class_prompt,
                                 num_class_images)
            return train_markdown(studio.trainer.status())

        def grid_image():
            job = studio.trainer.job
            try:
                return job.grid_view() if job else None
            except OSError:  # being written right now: show it next time
                return gr.skip()

        def train_status():
            status = studio.trainer.status()
            return progress_bar(status), train_markdown(status), grid_image()

        def watch_training(current):
            import time

            while True:
                status = studio.trainer.status()
                if status is None or status["state"] not in ("preparing", "training", "finishing"):
                    break
                yield progress_bar(status), train_markdown(status), grid_image(), gr.skip(), gr.skip()
                time.sleep(1.0)
            choices = file_choices()
            new = (status or {}).get("weights") or current
            new = new if new in [p for _, p in choices] else current
            card = studio.trainer.job.model_card() if studio.trainer.job else ""
            yield (progress_bar(status), train_markdown(status), grid_image(), gr.Dropdown(choices=choices, value=new),
                   card)

        def load_trained(path, prompt_now, add, *scales):
            """When a training finishes, its adapter is loaded, ready to use."""
            status = studio.trainer.status() or {}
            if status.get("state") != "done" or not path or path != status.get("weights"):
                return [*keep_slots, gr.skip(), gr.skip()]
            return load_selected(path, prompt_now, add, *scales)

        def pick_example(name):
            """A bundled subject fills both prompts (its images are used as they are)."""
            if name not in subjects:
                return gr.skip(), gr.skip(), gr.File(interactive=True)
            s = subjects[name]
            return s["instance_prompt"], s["class_prompt"], gr.File(interactive=False)

        example.change(pick_example, [example], [instance_prompt, class_prompt, train_files], **private)
        train_btn.click(
            train, [train_files, instance_prompt, adapter_name, preset, budget, train_steps, lr, train_seed,
                    val_images, val_steps, example, prior, class_prompt, num_class], [train_md], api_name="train",
            concurrency_id="train", concurrency_limit=1,
        ).success(watch_training, [adapter_file], [train_bar, train_md, train_grid, adapter_file, train_card], **private,
                  concurrency_limit=None, show_progress="hidden"
        ).then(load_trained, [adapter_file, prompt, add_trigger, *slot_scales], [*slot_outputs, adapter_msg, prompt],
               **private, **pipe_queue)

        def train_status_api() -> TrainStatus | None:
            """The current (or last) training: state, step, max_steps, loss, error, weights, grid...; None before
            the first one."""
            return studio.trainer.status()

        gr.api(train_status_api, api_name="train_status")
        status_btn.click(train_status, None, [train_bar, train_md, train_grid], **private, concurrency_limit=None)

        @api_errors
        def stop_training():
            """Stop the running training after its current step."""
            studio.trainer.cancel()
            return train_markdown(studio.trainer.status())

        stop_btn.click(stop_training, None, [train_md], api_name="stop_training", concurrency_limit=None)

        demo.load(lambda: (gr.Dropdown(choices=file_choices()), *train_status(), *slot_updates(), *show_cards("")),
                  None, [adapter_file, train_bar, train_md, train_grid, *slot_outputs, *card_outputs], **private)
    name_api_outputs(demo, {"refresh_adapters": "trained_adapters", "load_adapter": "adapters",
                            "remove_adapter": "adapters", "adapter_info": "adapters", "adapter_cards": "cards",
                            "delete_adapter": "cards", "train_status": "status"})
    return demo


def name_api_outputs(demo: gr.Blocks, labels: dict[str, str]) -> None:
    """gr.api labels its outputs '1st', '2nd'...; give those endpoints' outputs a name for view_api()."""
    for fn in demo.fns.values():
        if fn.api_name in labels:
            for output in fn.outputs:
                output.label = labels[fn.api_name]


def launch(studio: Studio, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True, **kwargs):
    demo = build_demo(studio)
    demo.queue(default_concurrency_limit=1, max_size=64)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, css=CSS, show_error=True,
                allowed_paths=[str(studio.adapters_dir.resolve())], **kwargs)  # card previews and downloads
    return demo
