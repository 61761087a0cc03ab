"""What the app does, without the layout: one shared pipeline, its adapters, generation, comparison and
background training. `app/ui.py` wires these methods to Gradio components; tests can call them directly.

Every user mistake raises `UserError` (or the library's `SuperLoRAFileError` / `TrainingError`) with one
line of text; the UI shows it as a notice (API clients get it as an error) and logs it as one line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypedDict

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

import superlora_diffusers  # noqa: F401  (attaches the pipeline verbs)
from superlora_diffusers import SuperLoRAConfig, SuperLoRAFileError
from superlora_diffusers.training import TrainingConfig, TrainingError
from superlora_diffusers.training.adapter import adapter_config, describe
from superlora_diffusers.training.data import IMAGE_EXTENSIONS
from superlora_diffusers.export import DIFFUSERS_LORA_NAME
from superlora_diffusers.serialization import WEIGHT_NAME
from superlora_diffusers.superlora import versus_lora1

logger = logging.getLogger("superlora.app")

# Bounds on what one request may ask for: the UI's sliders stop there and the API refuses beyond.
MAX_ADAPTERS = 4
SCALE_RANGE = (-1.0, 2.0)
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MAX_IMAGES = 8
MAX_SWEEP = 9
MAX_SWEEP_ROWS = 4
MAX_SEED = 2**31 - 1
TRAIN_IMAGES = (3, 10)
MAX_TRAIN_STEPS = 2000
MAX_BUDGET = 10_000_000
DISPLAY_MIN = 256  # small images (the toy model's 32x32) are shown enlarged, pixel for pixel
SKIP_DIRS = re.compile(r"^(checkpoint-\d+|\..*|__pycache__|logs|instance_images|validation)$")

Progress = Callable[[int, int, str], None]  # (done, total, what)
# name -> (diffusers scheduler class, extra config): the samplers A1111 users know by these names
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM-Solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
}
DEFAULT_SAMPLER = "DPM-Solver++"
TAG = re.compile(r"<(?:super)?lora:([^:>]+)(?::([^:>]*))?(?::([^:>]*))?>", re.IGNORECASE)  # either tag, either kind
PROMPT_LEAD = re.compile(r"^\s*(?:(?:a|an|the)\s+(?:photo|picture|image|painting|drawing|render)\s+of\s+)?(?:(?:a|an|the)\s+)?",
                         re.IGNORECASE)
XY_AXES = ("scale", "seed", "steps", "guidance", "sampler")
MAX_XY = 6  # values per X/Y axis (at most 36 images)
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"  # the bundled subjects (examples/<name>/)
MAX_CLASS_IMAGES = 200
PNG_KEY = "superlora"  # the PNG text chunk with the exact settings (JSON); "parameters" holds A1111's line
SUPERLORA, LORA = "SuperLoRA", "LoRA"  # the two kinds of adapter file the app loads


class UserError(ValueError):
    """A bad request, reported in the UI as one line; nothing was changed."""


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---- images ---------------------------------------------------------------------------------------
def enlarge(image: Image.Image, min_side: int = DISPLAY_MIN) -> Image.Image:
    """Nearest-neighbour upscale by an integer factor until the short side is >= min_side (exact pixels)."""
    factor = max(1, math.ceil(min_side / min(image.size)))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def labeled_grid(rows: list[list[Image.Image]], col_labels: Sequence[str], row_labels: Sequence[str] | None = None,
                 cell: int = 160) -> Image.Image:
    """A white sheet: a header of column labels, optional row labels on the left, images enlarged to `cell`."""
    font = _font(14)
    pad, head = 6, 24
    cells = [[enlarge(im, cell) for im in row] for row in rows]
    w = max(im.width for row in cells for im in row)
    h = max(im.height for row in cells for im in row)
    left = (max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=font) for s in row_labels) + 2 * pad
            if row_labels else 0)
    left = int(math.ceil(left))
    ncols = max(len(r) for r in cells)
    sheet = Image.new("RGB", (left + ncols * (w + pad) + pad, head + len(cells) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for j, label in enumerate(col_labels):
        draw.text((left + pad + j * (w + pad), 5), label, fill="black", font=font)
    for i, row in enumerate(cells):
        y = head + i * (h + pad)
        if row_labels:
            draw.text((pad, y + h // 2 - 7), row_labels[i], fill="black", font=font)
        for j, im in enumerate(row):
            sheet.paste(im, (left + pad + j * (w + pad), y))
    return sheet


def parse_scales(text: str) -> list[float]:
    """'0, 0.25, 0.5' -> [0.0, 0.25, 0.5], bounded in count and range."""
    parts = [p for p in re.split(r"[,\s;]+", str(text or "").strip()) if p]
    if not parts:
        raise UserError("give the sweep's scales, e.g. 0, 0.25, 0.5, 0.75, 1.0")
    try:
        scales = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"sweep scales must be numbers separated by commas, got {text!r}") from None
    if len(scales) > MAX_SWEEP:
        raise UserError(f"at most {MAX_SWEEP} sweep scales, got {len(scales)}")
    lo, hi = SCALE_RANGE
    if any(not math.isfinite(s) or not lo <= s <= hi for s in scales):
        raise UserError(f"sweep scales must lie in [{lo}, {hi}], got {text!r}")
    return scales


def parse_axis(axis: str, text: str) -> list[Any]:
    """An X/Y grid axis: 'seed' + '1, 2, 3' -> [1, 2, 3], bounded like the settings it replaces."""
    if axis not in XY_AXES:
        raise UserError(f"unknown X/Y axis {axis!r}; choose one of {', '.join(XY_AXES)}")
    parts = [p.strip() for p in re.split(r"[,;]+", str(text or "")) if p.strip()]
    if not parts:
        raise UserError(f"give the {axis} values, comma-separated")
    if len(parts) > MAX_XY:
        raise UserError(f"at most {MAX_XY} values per axis, got {len(parts)} for {axis}")
    if axis == "sampler":
        unknown = [p for p in parts if p not in SAMPLERS]
        if unknown:
            raise UserError(f"unknown sampler {unknown[0]!r}; choose among {', '.join(SAMPLERS)}")
        return parts
    try:
        values = [int(p) if axis in ("seed", "steps") else float(p) for p in parts]
    except ValueError:
        kind = "whole numbers" if axis in ("seed", "steps") else "numbers"
        raise UserError(f"{axis} values must be {kind} separated by commas, got {text!r}") from None
    lo, hi = {"scale": SCALE_RANGE, "seed": (0, MAX_SEED), "steps": (1, MAX_STEPS), "guidance": (0, MAX_GUIDANCE)}[axis]
    if any(not (math.isfinite(v) and lo <= v <= hi) for v in values):
        raise UserError(f"{axis} values must lie in [{lo}, {hi}], got {text!r}")
    return values


def captioned(image: Image.Image, text: str) -> Image.Image:
    """`image` under a one-line white caption (a training's validation grid says which step and prompt it shows)."""
    font, head = _font(14), 24
    sheet = Image.new("RGB", (max(image.width, 8 * len(text) + 12), image.height + head), "white")
    ImageDraw.Draw(sheet).text((6, 5), text, fill="black", font=font)
    sheet.paste(image.convert("RGB"), (0, head))
    return sheet


# ---- prompts: trigger words and <superlora:name:weight> tags ---------------------------------------
def trigger_phrase(instance_prompt: str) -> str:
    """The words that call up a DreamBooth subject: its instance prompt without 'a photo of' ('sks star')."""
    return PROMPT_LEAD.sub("", str(instance_prompt or "")).strip()


def insert_trigger(prompt: str, instance_prompt: str) -> str:
    """The prompt with the adapter's trigger words added, as A1111 adds a LoRA's activation text (once)."""
    prompt, trigger = str(prompt or "").strip(), trigger_phrase(instance_prompt)
    if not trigger or trigger.lower() in prompt.lower():
        return prompt
    return instance_prompt.strip() if not prompt else f"{prompt}, {trigger}"


def _weight(text: str | None, default: float, tag: str) -> float:
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{tag}: the weight {text!r} is not a number; write e.g. <superlora:name:0.8>") from None
    lo, hi = SCALE_RANGE
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UserError(f"{tag}: weights must lie in [{lo}, {hi}], got {value:g}")
    return value


def parse_prompt_tags(prompt: str) -> tuple[str, dict[str, tuple[float, float]]]:
    """'<superlora:name:0.8>' or A1111's '<lora:name:0.8>', for a SuperLoRA or a LoRA alike (':0.8:0.5' for UNet
    and text encoder apart) -> (the prompt without the tags, {name: (unet weight, text-encoder weight)})."""
    tags: dict[str, tuple[float, float]] = {}
    for m in TAG.finditer(str(prompt or "")):
        unet = _weight(m.group(2), 1.0, m.group(0))
        tags[m.group(1).strip()] = (unet, _weight(m.group(3), unet, m.group(0)))
    clean = re.sub(r"\s*,\s*(,|$)", r"\1", TAG.sub("", str(prompt or "")))
    return re.sub(r"\s{2,}", " ", clean).strip(" ,"), tags


# ---- generation settings in PNG text chunks --------------------------------------------------------
def settings_line(settings: dict[str, Any]) -> str:
    """A1111's 'parameters' text, so other tools that read it show the settings too."""
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    tag = {LORA: "lora"}  # A1111's tag for a LoRA; SuperLoRAs keep theirs (and PNGs from before kinds existed)
    loras = "".join(f" <{tag.get(a.get('kind'), 'superlora')}:{a['name']}:{a['unet']:g}:{a['text_encoder']:g}>"
                    for a in settings.get("adapters", []))
    lines.append(f"Steps: {settings['steps']}, Sampler: {settings['sampler']}, CFG scale: {settings['guidance_scale']:g}, "
                 f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}{',' if loras else ''}{loras}")
    return "\n".join(lines)


def with_settings(image: Image.Image, settings: dict[str, Any]) -> Image.Image:
    """Attach the settings as PNG text chunks (Gradio and PIL write `info`'s strings into the PNG)."""
    image.info[PNG_KEY] = json.dumps(settings)
    image.info["parameters"] = settings_line(settings)
    return image


def read_png_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings this app wrote into a PNG (its 'superlora' text chunk)."""
    name = Path(path).name
    try:
        with Image.open(path) as im:
            text = (getattr(im, "text", None) or im.info).get(PNG_KEY)
    except (UnidentifiedImageError, OSError):
        raise UserError(f"cannot read {name!r} as an image; drop a PNG generated by this app") from None
    if not text:
        raise UserError(f"{name!r} holds no SuperLoRA studio settings; drop a PNG generated by this app")
    try:
        settings = json.loads(text)
    except ValueError:
        raise UserError(f"{name!r} has a damaged settings chunk; drop another PNG generated by this app") from None
    if not isinstance(settings, dict) or "prompt" not in settings:
        raise UserError(f"{name!r} has a damaged settings chunk; drop another PNG generated by this app")
    return settings


def example_subjects(root: Path = EXAMPLES_DIR) -> dict[str, dict[str, Any]]:
    """The bundled subjects: name -> images and the instance / class prompts of their prompt.txt."""
    subjects = {}
    for folder in sorted(root.glob("*/prompt.txt")) if root.is_dir() else []:
        fields = dict(line.split(":", 1) for line in folder.read_text().splitlines() if ":" in line)
        images = sorted(p for p in folder.parent.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        subjects[folder.parent.name] = {"images": [str(p) for p in images],
                                        "instance_prompt": fields.get("instance_prompt", "").strip(),
                                        "class_prompt": fields.get("class_prompt", "").strip()}
    return subjects


def check_image(path: str | os.PathLike) -> Image.Image:
    name = Path(path).name
    if Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"{name!r} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"cannot read image {name!r} ({type(e).__name__}); remove or replace it") from None
    if min(image.size) < 8:
        raise UserError(f"image {name!r} is {image.width}x{image.height}; use images of at least 8x8 pixels")
    return image


LORA_FACTOR = re.compile(r"(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up)\.weight$")  # diffusers/peft, kohya
LORA_DOWN = ("lora_A.weight", "lora_down.weight", "lora.down.weight")  # one per adapted layer; shape[0] is its rank


@dataclass
class AdapterFile:
    """What a .safetensors header says about an adapter (no tensor read): enough to list, describe and load it."""
    kind: str  # SUPERLORA or LORA
    metadata: dict[str, str]
    num_parameters: int
    ranks: list[int] = field(default_factory=list)  # a LoRA's distinct layer ranks
    num_layers: int = 0  # a LoRA's adapted layers

    @property
    def instance_prompt(self) -> str:
        """The trainer's instance prompt (a kohya export keeps it as modelspec.trigger_phrase)."""
        return self.metadata.get("instance_prompt") or self.metadata.get("modelspec.trigger_phrase", "")


def read_adapter_file(path: Path, shown: str | None = None) -> AdapterFile:
    """The file's kind from its header alone (never a pickle, no tensors loaded): a SuperLoRA by its metadata
    'format', a LoRA by its factor keys; anything else is one UserError line saying what is accepted."""
    from safetensors import SafetensorError, safe_open

    shown = shown or Path(path).name
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{shown!r} is not a readable safetensors file ({one_line(e)}); it may be truncated or "
                        "corrupt") from None
    if metadata.get("format") == "superlora":
        return AdapterFile(SUPERLORA, metadata, int(metadata.get("num_parameters") or 0))
    factors = {k: s for k, s in shapes.items() if LORA_FACTOR.search(k)}
    if not factors:
        example = f", e.g. {next(iter(shapes))!r}" if shapes else ""
        raise UserError(f"{shown!r} is neither a SuperLoRA nor a LoRA ({len(shapes)} tensors{example}, no LoRA keys); "
                        "load a SuperLoRA file or a LoRA with diffusers/peft (lora_A/lora_B) or kohya "
                        "(lora_down/lora_up) keys")
    downs = [s for k, s in factors.items() if k.endswith(LORA_DOWN)]
    return AdapterFile(LORA, metadata, sum(math.prod(s) for s in factors.values()), sorted({s[0] for s in downs}),
                       len(downs))


def adapter_kind(path: Path) -> str | None:
    """SUPERLORA, LORA, or None for any other file: what the adapter folder lists."""
    try:
        return read_adapter_file(path).kind
    except UserError:
        return None


def weight_file(path: Path) -> Path:
    """The adapter file a path names: the file itself, or in a folder its SuperLoRA file, else its diffusers LoRA."""
    if not path.is_dir():
        return path
    lora = path / DIFFUSERS_LORA_NAME
    return lora if lora.is_file() and not (path / WEIGHT_NAME).is_file() else path / WEIGHT_NAME


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- what the API returns: TypedDicts, so gradio_client's view_api() names every field and its type ------
class AdapterRow(TypedDict):
    """One loaded adapter (/adapter_info, /load_adapter, /remove_adapter; the adapter panel's lines)."""
    name: str
    kind: Literal["SuperLoRA", "LoRA"]
    source: str
    instance_prompt: str
    trigger: str
    base_model: str
    config: str
    ranks: list[int] | None  # a LoRA's layer ranks
    target_modules: str | list[str] | None
    num_targets: int
    num_parameters: int
    file_bytes: int
    lora_rank1_parameters: int | None  # a SuperLoRA's rank-1 LoRA of the same targets
    lora_rank1_ratio: float | None
    versus_lora1: str


class AdapterCard(TypedDict):
    """One adapter file in the folder, from its header (/adapter_cards; the Library tab)."""
    label: str
    file: str
    preview: str | None
    kind: Literal["SuperLoRA", "LoRA"]
    trigger: str
    instance_prompt: str
    base_model: str
    num_parameters: int
    file_bytes: int
    loaded: bool


class TrainStatus(TypedDict):
    """The current or last training (/train_status; the Train tab)."""
    name: str
    state: Literal["preparing", "training", "finishing", "done", "failed", "cancelled"]
    step: int
    max_steps: int
    loss: float | None
    error: str
    weights: str
    output_dir: str
    config: str
    num_parameters: int
    instance_prompt: str
    elapsed_s: float
    grid: str | None
    stop_requested: bool


# ---- the studio -----------------------------------------------------------------------------------
@dataclass
class LoadedAdapter:
    name: str
    source: str  # path shown to the user
    file_size: int
    header: AdapterFile  # its kind, and a LoRA's ranks and size (the pipeline keeps no record of a LoRA's file)

    @property
    def kind(self) -> str:
        return self.header.kind


class Studio:
    """One pipeline shared by every request (guarded by a lock), its loaded adapters and the trainer."""

    def __init__(self, base: str = "toy", adapters_dir: str | os.PathLike = "out", device: str | None = None,
                 pipe=None) -> None:
        from superlora_diffusers.toy import resolve_base_model

        self.base = base or "toy"
        self.base_path = resolve_base_model(self.base)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = pipe if pipe is not None else load_pipeline(self.base_path, self.device)
        self.lock = threading.RLock()
        self.loaded: list[LoadedAdapter] = []
        self.adapters_dir = Path(adapters_dir)
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        unet = self.pipe.unet
        self.native = int(unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        self.size_multiple = 8
        self.max_side = max(self.native, min(2048, 8 * self.native))
        self.scheduler_config = dict(self.pipe.scheduler.config)
        self.sampler = ""  # the scheduler now on the pipeline (set per request)
        self.trainer = Trainer(self)

    # ---- adapters -------------------------------------------------------------------------------
    def list_adapter_files(self, max_depth: int = 4) -> list[tuple[str, str]]:
        """(label, path) of every SuperLoRA or LoRA file under the adapter folder; checkpoints are skipped."""
        root = self.adapters_dir
        found: list[tuple[str, str]] = []
        if not root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            dirnames[:] = sorted(d for d in dirnames if not SKIP_DIRS.match(d) and depth < max_depth)
            for f in sorted(filenames):
                if not f.endswith(".safetensors"):
                    continue
                path = Path(dirpath) / f
                if adapter_kind(path) is not None:
                    found.append((self._label(path), str(path)))
        return sorted(found)

    def _label(self, path: Path) -> str:
        """A path's folder-list label: the folder alone when the folder names this very file (`weight_file`: its
        SuperLoRA, else its diffusers LoRA), the relative path otherwise."""
        rel = path.resolve().relative_to(self.adapters_dir.resolve())
        named = rel.parent != Path(".") and weight_file(path.parent).name == path.name
        return str(rel.parent if named else rel)

    def _unique_name(self, label: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", label.removesuffix(".safetensors")).strip("-") or "adapter"  # peft: no '.'
        taken = {a.name for a in self.loaded}
        name, i = stem, 2
        while name in taken:
            name, i = f"{stem}-{i}", i + 1
        return name

    def resolve_adapter(self, path_or_label: str | os.PathLike | None) -> tuple[str, str]:
        """(path, label) of an adapter named by its folder-list label or by a path inside the adapter folder (a
        run that just finished is found without rescanning); paths elsewhere must be uploaded instead."""
        if not path_or_label:
            raise UserError("pick an adapter from the list (or upload a .safetensors file) first")
        listed = self.list_adapter_files()
        for label, path in listed:
            if str(path_or_label) in (label, path):
                return path, label
        path = Path(path_or_label)
        root = self.adapters_dir.resolve()
        if not path.resolve().is_relative_to(root):
            raise UserError(f"{str(path_or_label)!r} is not in the adapter folder {str(self.adapters_dir)!r}; "
                            "upload the file instead")
        return str(path), self._label(path)

    def adapter_cards(self, query: str = "") -> list[AdapterCard]:
        """One card per adapter in the folder (header only): label, path, preview (the run's own `samples.png`, its
        validation sample), kind, trigger words, trainable parameters, bytes, base model, loaded or not; `query`
        filters on label, trigger words and base model."""
        loaded = {a.source for a in self.loaded}
        cards = []
        for label, path in self.list_adapter_files():
            header = read_adapter_file(Path(path))
            preview = Path(path).parent / "samples.png"
            card: AdapterCard = {
                "label": label, "file": path, "preview": str(preview) if preview.is_file() else None,
                "kind": header.kind, "trigger": trigger_phrase(header.instance_prompt),
                "instance_prompt": header.instance_prompt, "base_model": header.metadata.get("base_model", ""),
                "num_parameters": header.num_parameters, "file_bytes": Path(path).stat().st_size,
                "loaded": path in loaded,
            }
            text = " ".join(str(card[k]) for k in ("label", "trigger", "base_model")).lower()
            if all(word in text for word in str(query or "").lower().split()):
                cards.append(card)
        return cards

    def delete_adapter_file(self, path_or_label: str) -> str:
        """Delete an adapter from the folder: its file, and its run folder when nothing else of it is left
        (the model card, samples and images the trainer wrote beside it); refused while it is loaded."""
        path, label = self.resolve_adapter(path_or_label)
        file = weight_file(Path(path))
        if not file.is_file():
            raise UserError(f"{label!r} does not exist (any more); refresh the adapter list")
        if any(a.source == str(file) for a in self.loaded):
            raise UserError(f"{label!r} is loaded; remove it from the slots (✕) before deleting it")
        folder = file.parent
        file.unlink()
        others = [p for p in folder.rglob("*.safetensors")]
        if folder.resolve() != self.adapters_dir.resolve() and not others:
            shutil.rmtree(folder)
        return label

    def load_adapter(self, path: str | os.PathLike, label: str | None = None) -> str:
        """Load a SuperLoRA or an ordinary LoRA (diffusers/peft or kohya keys; a file, or a folder holding
        superlora_weights.safetensors or pytorch_lora_weights.safetensors); returns its name."""
        if not path:
            raise UserError("pick an adapter from the list (or upload a .safetensors file) first")
        path = Path(path)
        file = weight_file(path)
        shown = label or (path.name if file is path else str(path))
        if file.suffix != ".safetensors":
            raise UserError(f"{file.name!r} is not a .safetensors file; a SuperLoRA or LoRA adapter is one "
                            ".safetensors file")
        if not file.is_file():
            raise UserError(f"{shown!r} does not exist (any more); refresh the adapter list")
        if len(self.loaded) >= MAX_ADAPTERS:
            raise UserError(f"at most {MAX_ADAPTERS} adapters at once; remove one first")
        if any(a.source == str(file) for a in self.loaded):
            raise UserError(f"{shown!r} is already loaded")
        header = read_adapter_file(file, shown)
        with self.lock:
            name = self._unique_name(label or file.name)
            if header.kind == SUPERLORA:
                try:
                    self.pipe.load_superlora_weights(str(file), adapter_name=name)
                except SuperLoRAFileError as e:
                    raise UserError(one_line(e).replace(repr(str(file)), repr(shown))) from None
            else:
                self._load_lora(file, name, shown)
            self.loaded.append(LoadedAdapter(name, str(file), file.stat().st_size, header))
        return name

    def _load_lora(self, file: Path, name: str, shown: str) -> None:
        """diffusers' own loader (it converts kohya keys itself, and removes a half-loaded adapter on failure).
        peft's "multiple adapters" warning is expected here: a SuperLoRA is a peft adapter too."""
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.pipe.load_lora_weights(str(file), adapter_name=name)
        except Exception as e:  # noqa: BLE001 (any loader failure is a refused file; the pipeline is unchanged)
            if "size mismatch" in str(e):
                raise UserError(f"{shown!r} is a LoRA for another base model (its layers have other shapes)") from None
            raise UserError(f"{shown!r} looks like a LoRA but diffusers cannot load it "
                            f"({type(e).__name__}: {one_line(e)})") from None

    def unload_adapter(self, index: int) -> str:
        with self.lock:
            if not 0 <= index < len(self.loaded):
                raise UserError(f"no adapter in slot {index + 1}")
            adapter = self.loaded.pop(index)
            if adapter.kind == SUPERLORA:
                self.pipe.delete_superlora_adapters(adapter.name)
            else:
                self.pipe.delete_adapters(adapter.name)
        return adapter.name

    def adapter_info(self) -> list[AdapterRow]:
        """Each loaded adapter's row for the info panel and /adapter_info, SuperLoRA and LoRA alike."""
        with self.lock:
            return [self._superlora_row(a) if a.kind == SUPERLORA else self._lora_row(a) for a in self.loaded]

    def _superlora_row(self, a: LoadedAdapter) -> AdapterRow:
        info = self.pipe.get_superlora_info(a.name)
        try:
            config = describe(SuperLoRAConfig.from_dict(info["config"]))
        except (ValueError, TypeError):
            config = str(info["config"])
        meta = info["metadata"]
        return {
            "name": a.name, "kind": a.kind, "source": a.source,
            "instance_prompt": meta.get("instance_prompt", ""),
            "trigger": trigger_phrase(meta.get("instance_prompt", "")),
            "base_model": meta.get("base_model", ""), "config": config, "ranks": None,
            "target_modules": info["config"].get("target_modules"), "num_targets": len(info["targets"]),
            "num_parameters": info["num_parameters"], "file_bytes": a.file_size,
            "lora_rank1_parameters": info["lora_rank1_parameters"], "lora_rank1_ratio": info["lora_rank1_ratio"],
            "versus_lora1": versus_lora1(info["num_parameters"], info["lora_rank1_parameters"]),
        }

    def _lora_row(self, a: LoadedAdapter) -> AdapterRow:
        """A LoRA's row from its file header, with the components diffusers actually adapted (a rank-1 comparison
        would compare a LoRA with itself: left empty)."""
        h = a.header
        ranks = h.ranks
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        components = [c for c, names in self.pipe.get_list_adapters().items() if a.name in names]
        return {
            "name": a.name, "kind": a.kind, "source": a.source,
            "instance_prompt": h.instance_prompt, "trigger": trigger_phrase(h.instance_prompt),
            "base_model": h.metadata.get("base_model", ""), "config": f"LoRA, {rank}", "ranks": ranks,
            "target_modules": "+".join(components), "num_targets": h.num_layers,
            "num_parameters": h.num_parameters, "file_bytes": a.file_size,
            "lora_rank1_parameters": None, "lora_rank1_ratio": None, "versus_lora1": "",
        }

    # ---- generation -----------------------------------------------------------------------------
    def check_request(self, prompt: str, steps: Any, guidance: Any, width: Any, height: Any) -> tuple[int, float, int, int]:
        if not str(prompt or "").strip():
            raise UserError("write a prompt first")
        try:
            steps, guidance, width, height = int(steps), float(guidance), int(width), int(height)
        except (TypeError, ValueError):
            raise UserError("steps, guidance, width and height must be numbers") from None
        if not 1 <= steps <= MAX_STEPS:
            raise UserError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
        if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
            raise UserError(f"guidance scale must be between 0 and {MAX_GUIDANCE}, got {guidance}")
        m = self.size_multiple
        for what, v in (("width", width), ("height", height)):
            if not m <= v <= self.max_side or v % m:
                raise UserError(f"{what} must be a multiple of {m} between {m} and {self.max_side}, got {v}")
        return steps, guidance, width, height

    def _seed(self, seed: Any, randomize: bool) -> int:
        if randomize:
            return random.randint(0, MAX_SEED)
        try:
            seed = int(seed)
        except (TypeError, ValueError):
            raise UserError(f"the seed must be a whole number, got {seed!r}") from None
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"the seed must be between 0 and {MAX_SEED}, got {seed}")
        return seed

    def weights_for(self, scales: Sequence[float] | None, text_scales: Sequence[float] | None = None,
                    tags: dict[str, tuple[float, float]] | None = None) -> list[tuple[str, float, float]]:
        """(name, UNet weight, text-encoder weight) per loaded adapter: the slot sliders (missing: 1.0), overridden
        by the prompt's <superlora:name:w> tags; a tag naming no loaded adapter is an error."""
        tags = dict(tags or {})
        by_name = {a.name.lower(): a.name for a in self.loaded}
        unknown = [t for t in tags if t.lower() not in by_name]
        if unknown:
            raise UserError(f"<superlora:{unknown[0]}> names no loaded adapter; load it first "
                            f"(loaded: {', '.join(by_name.values()) or 'none'})")
        tagged = {by_name[t.lower()]: w for t, w in tags.items()}
        lo, hi = SCALE_RANGE

        def pick(values: Sequence[float] | None, i: int, default: float) -> float:
            values = list(values or [])
            v = float(values[i]) if i < len(values) and values[i] is not None else default
            if not (math.isfinite(v) and lo <= v <= hi):
                raise UserError(f"adapter scales must lie in [{lo}, {hi}], got {v}")
            return v

        weights = []
        for i, a in enumerate(self.loaded):
            unet = pick(scales, i, 1.0)
            weights.append((a.name, *tagged.get(a.name, (unet, pick(text_scales, i, 1.0)))))
        return weights

    def _activate(self, weights: list[tuple[str, float, float]]) -> None:
        """Switch every loaded adapter on, SuperLoRA and LoRA alike, in one diffusers `set_adapters` call: each gets
        its UNet weight on the UNet and its text-encoder weight on the text encoders, naming only the components it
        adapts (diffusers warns about the others). `enable_lora` turns on every peft adapter, SuperLoRAs included."""
        if not self.loaded:
            return
        adapted = self.pipe.get_list_adapters()
        self.pipe.set_adapters([n for n, _, _ in weights],
                               [{c: u if c == "unet" else t for c, names in adapted.items() if n in names}
                                for n, u, t in weights])
        self.pipe.enable_lora()

    def _use_sampler(self, sampler: str | None) -> str:
        """Put the named scheduler on the pipeline (built from the base model's own scheduler config)."""
        sampler = sampler or DEFAULT_SAMPLER
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if sampler != self.sampler:
            import diffusers

            cls, extra = SAMPLERS[sampler]
            self.pipe.scheduler = getattr(diffusers, cls).from_config(self.scheduler_config, **extra)
            self.sampler = sampler
        return sampler

    def _run(self, prompt: str, negative: str, seeds: Sequence[int], steps: int, guidance: float, width: int,
             height: int, report: Callable[[], None] | None, scale: float | None = None) -> list[Image.Image]:
        def on_step(pipe, i, t, kwargs):
            if report:
                report()
            return kwargs

        kwargs: dict[str, Any] = {}
        if scale is not None and self.loaded:
            kwargs["cross_attention_kwargs"] = {"scale": float(scale)}
        out = self.pipe(
            prompt=prompt, negative_prompt=(negative or None), num_images_per_prompt=len(seeds),
            num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], callback_on_step_end=on_step,
            **kwargs,
        )
        return list(out.images)

    @staticmethod
    def _counter(total: int, progress: Progress | None, what: str) -> Callable[[], None]:
        done = [0]

        def report() -> None:
            done[0] += 1
            if progress:
                progress(min(done[0], total), total, what)

        if progress:
            progress(0, total, what)
        return report

    def _prepare(self, prompt: str, steps: Any, guidance: Any, width: Any, height: Any, sampler: str | None,
                 scales: Sequence[float] | None, text_scales: Sequence[float] | None
                 ) -> tuple[str, int, float, int, int, str, list[tuple[str, float, float]]]:
        """Checked settings: (prompt without tags, steps, guidance, width, height, sampler, adapter weights)."""
        steps, guidance, width, height = self.check_request(prompt, steps, guidance, width or self.native,
                                                            height or self.native)
        clean, tags = parse_prompt_tags(prompt)
        if not clean:
            raise UserError("the prompt holds only <superlora:...> tags; write what to draw too")
        if (sampler or DEFAULT_SAMPLER) not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        return clean, steps, guidance, width, height, sampler or DEFAULT_SAMPLER, self.weights_for(scales, text_scales, tags)

    def generate(self, prompt: str, negative: str = "", seed: Any = 0, randomize: bool = False, steps: Any = 20,
                 guidance: Any = 5.0, width: Any = None, height: Any = None, num_images: Any = 1,
                 scales: Sequence[float] | None = None, progress: Progress | None = None, sampler: str | None = None,
                 text_scales: Sequence[float] | None = None) -> tuple[list[Image.Image], int]:
        """Images (at the model's size, their settings in PNG text chunks) and the seed used; image i uses seed + i."""
        clean, steps, guidance, width, height, sampler, weights = self._prepare(
            prompt, steps, guidance, width, height, sampler, scales, text_scales)
        try:
            n = int(num_images)
        except (TypeError, ValueError):
            raise UserError("number of images must be a whole number") from None
        if not 1 <= n <= MAX_IMAGES:
            raise UserError(f"number of images must be between 1 and {MAX_IMAGES}, got {n}")
        seed = self._seed(seed, randomize)
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(n)]
        with self.lock:
            self._activate(weights)
            self._use_sampler(sampler)
            images = self._run(clean, negative, seeds, steps, guidance, width, height,
                               self._counter(steps, progress, "generating"))
            kinds = {a.name: a.kind for a in self.loaded}
        settings = {"prompt": prompt, "negative_prompt": negative or "", "steps": steps, "guidance_scale": guidance,
                    "sampler": sampler, "width": width, "height": height, "base_model": self.base,
                    "adapters": [{"name": n, "kind": kinds[n], "unet": u, "text_encoder": t} for n, u, t in weights]}
        return [with_settings(im, {**settings, "seed": s}) for im, s in zip(images, seeds)], seed

    def compare(self, prompt: str, negative: str = "", seed: Any = 0, randomize: bool = False, steps: Any = 20,
                guidance: Any = 5.0, width: Any = None, height: Any = None, scales: Sequence[float] | None = None,
                progress: Progress | None = None, sampler: str | None = None,
                text_scales: Sequence[float] | None = None) -> tuple[Image.Image, Image.Image, int]:
        """(without adapters, with adapters, seed): the same seed and settings, side by side."""
        clean, steps, guidance, width, height, sampler, weights = self._prepare(
            prompt, steps, guidance, width, height, sampler, scales, text_scales)
        if not self.loaded:
            raise UserError("load an adapter first: compare shows the same seed without and with it")
        seed = self._seed(seed, randomize)
        with self.lock:
            self._activate(weights)
            self._use_sampler(sampler)
            report = self._counter(2 * steps, progress, "comparing")
            self.pipe.disable_lora()  # every peft adapter: the LoRAs and the SuperLoRAs
            try:
                (base,) = self._run(clean, negative, [seed], steps, guidance, width, height, report)
            finally:
                self.pipe.enable_lora()
            (adapted,) = self._run(clean, negative, [seed], steps, guidance, width, height, report)
        return base, adapted, seed

    def compare_sheet(self, base: Image.Image, adapted: Image.Image, seed: int) -> Image.Image:
        names = " + ".join(a.name for a in self.loaded)
        return labeled_grid([[base, adapted]], ["without adapter", f"with {names}"[:40]], cell=max(DISPLAY_MIN, base.width))

    def sweep(self, prompt: str, negative: str = "", seed: Any = 0, randomize: bool = False, steps: Any = 20,
              guidance: Any = 5.0, width: Any = None, height: Any = None, scales_text: str = "0, 0.25, 0.5, 0.75, 1.0",
              rows: Any = 1, scales: Sequence[float] | None = None, progress: Progress | None = None,
              sampler: str | None = None, text_scales: Sequence[float] | None = None
              ) -> tuple[Image.Image, int, list[float]]:
        """A grid: one column per call-time scale (multiplying the adapter mix), one row per seed."""
        clean, steps, guidance, width, height, sampler, weights = self._prepare(
            prompt, steps, guidance, width, height, sampler, scales, text_scales)
        if not self.loaded:
            raise UserError("load an adapter first: the sweep varies its scale")
        sweep = parse_scales(scales_text)
        try:
            n_rows = int(rows)
        except (TypeError, ValueError):
            raise UserError("rows must be a whole number") from None
        if not 1 <= n_rows <= MAX_SWEEP_ROWS:
            raise UserError(f"rows (seeds) must be between 1 and {MAX_SWEEP_ROWS}, got {n_rows}")
        seed = self._seed(seed, randomize)
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(n_rows)]
        columns = []
        with self.lock:
            self._activate(weights)
            self._use_sampler(sampler)
            report = self._counter(len(sweep) * steps, progress, "sweeping")
            for s in sweep:
                columns.append(self._run(clean, negative, seeds, steps, guidance, width, height, report, scale=s))
        grid_rows = [[columns[j][i] for j in range(len(sweep))] for i in range(n_rows)]
        sheet = labeled_grid(grid_rows, [f"scale {s:g}" for s in sweep], [f"seed {s}" for s in seeds],
                             cell=max(128, width))
        return sheet, seed, sweep

    def xy_grid(self, prompt: str, negative: str = "", seed: Any = 0, randomize: bool = False, steps: Any = 20,
                guidance: Any = 5.0, width: Any = None, height: Any = None, sampler: str | None = None,
                x_axis: str = "seed", x_values: str = "0, 1", y_axis: str = "steps", y_values: str = "10, 20",
                scales: Sequence[float] | None = None, text_scales: Sequence[float] | None = None,
                progress: Progress | None = None) -> tuple[Image.Image, int]:
        """A labelled grid over any two of scale (call-time, multiplying the adapter mix), seed, steps, guidance
        and sampler, as A1111's X/Y plot; every other setting as in Generate. Returns (sheet, the base seed)."""
        clean, steps, guidance, width, height, sampler, weights = self._prepare(
            prompt, steps, guidance, width, height, sampler, scales, text_scales)
        if x_axis == y_axis:
            raise UserError(f"the X and Y axes are both {x_axis}; pick two different ones")
        xs, ys = parse_axis(x_axis, x_values), parse_axis(y_axis, y_values)
        if "scale" in (x_axis, y_axis) and not self.loaded:
            raise UserError("load an adapter first: the scale axis varies its strength")
        seed = self._seed(seed, randomize)
        base = {"seed": seed, "steps": steps, "guidance": guidance, "sampler": sampler, "scale": None}
        cells = [[{**base, x_axis: x, y_axis: y} for x in xs] for y in ys]
        rows = []
        with self.lock:
            self._activate(weights)
            report = self._counter(sum(c["steps"] for row in cells for c in row), progress, "X/Y grid")
            for row in cells:
                rows.append([])
                for c in row:
                    self._use_sampler(c["sampler"])
                    (image,) = self._run(clean, negative, [c["seed"]], c["steps"], c["guidance"], width, height, report,
                                         scale=c["scale"])
                    rows[-1].append(image)
        def label(axis: str, value: Any) -> str:
            return f"{axis} {value:g}" if isinstance(value, float) else f"{axis} {value}"

        sheet = labeled_grid(rows, [label(x_axis, x) for x in xs], [label(y_axis, y) for y in ys], cell=max(128, width))
        return sheet, seed


def load_pipeline(path: str, device: str = "cpu"):
    """The base pipeline for generation, with DPM-Solver++ (good images in ~20 steps)."""
    from diffusers import DPMSolverMultistepScheduler

    from superlora_diffusers.toy import load_toy_pipeline

    pipe = load_toy_pipeline(name_or_path=path, device=device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


# ---- training -------------------------------------------------------------------------------------
class Cancelled(Exception):
    pass


@dataclass
class TrainJob:
    name: str
    output_dir: Path
    instance_prompt: str
    max_steps: int
    config: str
    num_parameters: int
    state: str = "preparing"  # preparing, training, finishing, done, failed, cancelled
    step: int = 0
    loss: float | None = None
    error: str = ""
    weights: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return self.state in ("preparing", "training", "finishing")

    def latest_grid(self) -> str | None:
        """The newest validation grid (the final samples once done)."""
        samples = self.output_dir / "samples.png"
        if samples.is_file():
            return str(samples)
        grids = sorted((self.output_dir / "validation").glob("step-*.png"))
        return str(grids[-1]) if grids else None

    def model_card(self) -> str:
        """The run's model card (README.md) without its YAML front matter, once the trainer has written it."""
        card = self.output_dir / "README.md"
        if not card.is_file():
            return ""
        text = card.read_text()
        if text.startswith("---"):
            text = text.split("---", 2)[-1]
        return text.strip()

    def grid_view(self) -> Image.Image | None:
        """The latest validation grid, enlarged and captioned with what it shows (step or final, and the prompt)."""
        path = self.latest_grid()
        if path is None:
            return None
        with Image.open(path) as im:
            grid = enlarge(im.convert("RGB"), 128)
        stem = Path(path).stem
        what = "final samples" if stem == "samples" else f"validation at step {int(stem.split('-')[-1])} of {self.max_steps}"
        return captioned(grid, f"{what} · {self.instance_prompt}")

    def summary(self) -> TrainStatus:
        return {
            "name": self.name, "state": self.state, "step": self.step, "max_steps": self.max_steps,
            "loss": self.loss, "error": self.error, "weights": self.weights, "output_dir": str(self.output_dir),
            "config": self.config, "num_parameters": self.num_parameters, "instance_prompt": self.instance_prompt,
            "elapsed_s": round((self.finished or time.time()) - self.started, 1), "grid": self.latest_grid(),
            "stop_requested": self.cancel.is_set(),
        }


class Trainer:
    """DreamBooth through the library's own `training.train`, one run at a time, in a background thread."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.job: TrainJob | None = None
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self, image_paths: Sequence[str] | None, instance_prompt: str, preset: str = "lorta",
              param_budget: Any = None, steps: Any = 400, name: str = "", learning_rate: Any = 5e-3,
              seed: Any = 0, validation_images: Any = 4, inference_steps: Any = 20, example: str = "",
              prior: bool = False, class_prompt: str = "", num_class_images: Any = 25) -> TrainJob:
        """Check everything, then train in a background thread. `example` names a bundled subject (its images,
        and its prompts where none are given); `prior` adds DreamBooth's prior preservation on `class_prompt`
        (class images generated by the base model into the run folder)."""
        from superlora_diffusers import PRESETS
        from superlora_diffusers.components import target_kernels, target_shapes

        prompt = str(instance_prompt or "").strip()
        if example:
            subjects = example_subjects()
            if example not in subjects:
                raise UserError(f"no bundled subject {example!r}; choose one of {', '.join(subjects) or 'none'}")
            image_paths = subjects[example]["images"]
            prompt = prompt or subjects[example]["instance_prompt"]
            class_prompt = str(class_prompt or "").strip() or subjects[example]["class_prompt"]
        if not prompt:
            raise UserError("write an instance prompt, e.g. 'a photo of sks star'")
        paths = [str(p) for p in (image_paths or []) if p]
        lo, hi = TRAIN_IMAGES
        if not lo <= len(paths) <= hi:
            raise UserError(f"upload {lo} to {hi} images of the subject, got {len(paths)}")
        images = [check_image(p) for p in paths]
        try:
            steps = int(steps)
            lr = float(learning_rate)
            seed = int(seed)
            n_val = int(validation_images)
            n_inf = int(inference_steps)
        except (TypeError, ValueError):
            raise UserError("steps, learning rate, seed, validation images and inference steps must be numbers") from None
        if not 1 <= steps <= MAX_TRAIN_STEPS:
            raise UserError(f"training steps must be between 1 and {MAX_TRAIN_STEPS}, got {steps}")
        if not (math.isfinite(lr) and 0 < lr <= 1):
            raise UserError(f"learning rate must be in (0, 1], got {lr}")
        if not 1 <= n_val <= 8 or not 1 <= n_inf <= MAX_STEPS:
            raise UserError(f"validation images must be 1-8 and inference steps 1-{MAX_STEPS}")
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        class_prompt, n_class = str(class_prompt or "").strip(), 0
        if prior:
            if not class_prompt:
                raise UserError("prior preservation needs a class prompt, e.g. 'a photo of a star'")
            try:
                n_class = int(num_class_images)
            except (TypeError, ValueError):
                raise UserError(f"the number of class images must be a whole number, got {num_class_images!r}") from None
            if not 1 <= n_class <= MAX_CLASS_IMAGES:
                raise UserError(f"class images must be between 1 and {MAX_CLASS_IMAGES}, got {n_class}")
        budget = None
        if param_budget not in (None, "", 0, 0.0):
            try:
                budget = int(param_budget)
            except (TypeError, ValueError):
                raise UserError(f"the parameter budget must be a whole number, got {param_budget!r}") from None
            if not 1 <= budget <= MAX_BUDGET:
                raise UserError(f"the parameter budget must be between 1 and {MAX_BUDGET:,} (0 = use the preset)")

        with self._lock:
            if self.job is not None and self.job.running:
                j = self.job
                raise UserError(f"a training is already running ({j.name}, step {j.step}/{j.max_steps}); "
                                "one at a time: wait for it to finish")
            slug = re.sub(r"[^A-Za-z0-9]+", "-", name.strip() or prompt).strip("-").lower()[:40] or "adapter"
            out = self.studio.adapters_dir / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"
            stem, i = out.name, 2
            while out.exists():
                out, i = out.with_name(f"{stem}-{i}"), i + 1
            config_args = dict(
                pretrained_model_name_or_path=self.studio.base, instance_data_dir=str(out / "instance_images"),
                instance_prompt=prompt, output_dir=str(out), max_train_steps=steps, superlora_preset=preset,
                learning_rate=lr, seed=seed, report_to="none", validation_prompt=prompt,
                validation_steps=max(1, math.ceil(steps / 4)), num_validation_images=n_val, num_inference_steps=n_inf,
                checkpointing_steps=MAX_TRAIN_STEPS + 1, random_flip=True, param_budget=budget,
            )
            if prior:
                config_args.update(with_prior_preservation=True, class_prompt=class_prompt, num_class_images=n_class,
                                   class_data_dir=str(out / "class_images"))
            try:
                training = TrainingConfig(**config_args).validate()
                pipe = self.studio.pipe
                components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
                config, _ = adapter_config(training, lambda targets: target_shapes(components, targets),
                                           kernels_for=lambda targets: target_kernels(components, targets))
                from superlora_diffusers import count_parameters

                n_params = count_parameters(config, target_shapes(components, config.target_modules),
                                            target_kernels(components, config.target_modules))
            except (TrainingError, ValueError) as e:
                raise UserError(one_line(e)) from None
            (out / "instance_images").mkdir(parents=True)
            for k, (src, image) in enumerate(zip(paths, images)):
                image.save(out / "instance_images" / f"{k:02d}.png")
            job = TrainJob(out.name, out, prompt, steps, describe(config), n_params)
            self.job = job
            self.thread = threading.Thread(target=self._run, args=(job, training), name=f"train-{out.name}", daemon=True)
            self.thread.start()
        return job

    def _run(self, job: TrainJob, training: TrainingConfig) -> None:
        from superlora_diffusers.training import train

        def on_step(step: int, max_steps: int, loss: float) -> None:
            job.step, job.max_steps, job.loss = step, max_steps, loss
            job.state = "finishing" if step >= max_steps else "training"
            if job.cancel.is_set():
                raise Cancelled()

        try:
            weights = train(training, on_step=on_step)
            job.weights = str(weights)
            job.state = "done"
        except Cancelled:
            job.state, job.error = "cancelled", f"stopped at step {job.step}"
        except TrainingError as e:
            job.state, job.error = "failed", one_line(e)
        except Exception as e:  # noqa: BLE001 (the app keeps running; the message goes to the UI and the log)
            logger.error("training %s failed:\n%s", job.name, traceback.format_exc())
            job.state, job.error = "failed", f"{type(e).__name__}: {one_line(e)}"
        finally:
            job.finished = time.time()
            if job.state != "done" and not (job.output_dir / WEIGHT_NAME).exists():
                shutil.rmtree(job.output_dir, ignore_errors=True)  # nothing usable: leave no half-made adapter

    def cancel(self) -> str:
        if self.job is None or not self.job.running:
            raise UserError("no training is running")
        self.job.cancel.set()
        return self.job.name

    def status(self) -> TrainStatus | None:
        return self.job.summary() if self.job else None

    def wait(self, timeout: float | None = None) -> TrainStatus | None:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.status()
