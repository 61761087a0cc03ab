"""Exits to the LoRA ecosystem: per-layer ΔW as a plain LoRA (truncated SVD) or as exact `.diff` keys.

Input everywhere is `{qualified_name: ΔW}` with names like `unet.down_blocks.0.…attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj` (the integration's target names), ΔW already
scaled. Output formats:
- diffusers / peft: `<name>.lora_A.weight` (r, d_in) and `<name>.lora_B.weight` (d_out, r); loads with
  `pipe.load_lora_weights` (alpha = r, so the scale is 1).
- kohya / A1111 / ComfyUI: `lora_unet_<path_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (`lora_te_`, `lora_te1_`, `lora_te2_` for text encoders).
- exact: `lora_unet_<path>.diff` (the full ΔW; large but lossless).

Text-encoder targets are written as `text_encoder.text_model.encoder...` whatever transformers version
found them (see `export_name`). The second half takes adapter files: `export_adapter` (file in, export file
and error report out), `merge_adapter` (a full diffusers folder with the adapter fused in).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .serialization import SuperLoRAFile

KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class LayerError:
    name: str
    rank: int
    relative_error: float  # ||ΔW - up·down||_F / ||ΔW||_F


def svd_factors(delta: torch.Tensor, rank: int | None = None, energy: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down (r, d_in), up (d_out, r), relative Frobenius error) of the best rank-r approximation.

    `rank` fixes r; `energy` picks the smallest r keeping that fraction of Σσ² (e.g. 0.99).
    """
    if (rank is None) == (energy is None):
        raise ValueError("pass exactly one of rank= or energy= for the SVD export.")
    w = delta.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy={energy} must be in (0, 1].")
        cumulative = torch.cumsum(s**2, 0) / max(float((s**2).sum()), 1e-300)
        rank = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=cumulative.dtype)).item()) + 1
    rank = max(1, min(int(rank), s.numel()))
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    total = float((s**2).sum())  # Eckart-Young: the error of the best rank-r approximation is its tail of σ
    error = (float((s[rank:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return down.to(delta.dtype), up.to(delta.dtype), error


def export_name(name: str) -> str:
    """The ecosystem's spelling of a target: text encoders as `text_encoder.text_model.encoder...`.

    transformers 5 dropped CLIPTextModel's `text_model` level, so targets found on a live model read
    `text_encoder.encoder.layers...`; every LoRA tool (diffusers, kohya, A1111, ComfyUI) names them
    `text_model.encoder.layers...`, and diffusers loads that spelling under both transformers 4 and 5.
    """
    component, _, path = name.partition(".")
    if component in TEXT_ENCODERS and path.startswith("encoder."):
        return f"{component}.text_model.{path}"
    return name


def kohya_key(name: str) -> str:
    component, _, path = export_name(name).partition(".")
    return f"{KOHYA_PREFIX.get(component, 'lora_' + component)}_{path.replace('.', '_')}"


def to_lora_state_dict(deltas: dict[str, torch.Tensor], rank: int | None = None, energy: float | None = None,
                       kohya: bool = False, kernels: dict[str, list[int]] | None = None
                       ) -> tuple[dict[str, torch.Tensor], list[LayerError]]:
    """SVD-truncated LoRA of every ΔW, in diffusers/peft or kohya key format, with per-layer errors.

    diffusers format: no alphas (scale 1 per layer, whatever its rank). kohya format: one `alpha` for every
    layer (the largest rank), the factors of a lower-rank layer scaled by sqrt(r/alpha) so that
    alpha/r · up·down = ΔW. One shared alpha matters: diffusers' kohya converter drops per-layer alphas of
    attention layers and applies the most common one everywhere, so per-layer alpha = r would mis-scale
    every layer whose rank differs from the majority.

    Conv targets (`kernels`: name -> [k_h, k_w]) export as conv LoRA, as peft and kohya load it: down is a
    (r, d_in, k_h, k_w) kernel, up a 1x1 (d_out, r, 1, 1) one.
    """
    kernels = kernels or {}
    factors, errors = {}, []
    for name, delta in deltas.items():
        down, up, err = svd_factors(delta.float(), rank, energy)
        factors[name] = (down, up)
        errors.append(LayerError(name, down.shape[0], err))
    state = {}
    alpha = max((e.rank for e in errors), default=1)
    for name, (down, up) in factors.items():
        if name in kernels:
            down = down.reshape(down.shape[0], -1, *kernels[name])
            up = up.reshape(*up.shape, 1, 1)
        if kohya:
            r = down.shape[0]
            if r != alpha:
                root = (r / alpha) ** 0.5
                down, up = down * root, up * root
            key = kohya_key(name)
            state[f"{key}.lora_down.weight"] = down.contiguous()
            state[f"{key}.lora_up.weight"] = up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(alpha))
        else:
            key = export_name(name)
            state[f"{key}.lora_A.weight"] = down.contiguous()
            state[f"{key}.lora_B.weight"] = up.contiguous()
    return state, errors


def to_diff_state_dict(deltas: dict[str, torch.Tensor], kernels: dict[str, list[int]] | None = None
                       ) -> dict[str, torch.Tensor]:
    """Exact export: the full per-layer ΔW under kohya-style `.diff` keys (conv targets in their kernel shape)."""
    kernels = kernels or {}
    return {
        f"{kohya_key(name)}.diff": (delta.reshape(delta.shape[0], -1, *kernels[name]) if name in kernels else delta)
        .detach().contiguous()
        for name, delta in deltas.items()
    }


def overall_error(deltas: dict[str, torch.Tensor], errors: list[LayerError]) -> float:
    """Relative Frobenius error of the whole super-vector: sqrt(Σ e_l²‖ΔW_l‖²) / ‖ΔW_all‖."""
    norms = {n: float(d.double().norm()) ** 2 for n, d in deltas.items()}
    total = sum(norms.values())
    return (sum(e.relative_error**2 * norms[e.name] for e in errors) / total) ** 0.5 if total > 0 else 0.0


# ---- adapter files in, export files and merged models out -----------------------------------------------

FORMATS = ("lora", "kohya", "diff")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights(folder) looks for


class ExportError(ValueError):
    """Bad export or merge input (format, rank, output path, base model); the message is one line."""


@dataclass
class ExportReport:
    """What an export wrote and how far it is from the SuperLoRA's ΔW."""

    format: str
    layers: list[LayerError]
    overall_error: float  # relative Frobenius error over all layers together
    num_values: int  # tensor entries in the export
    rank: int | None = None
    energy: float | None = None
    path: Path | None = None
    bytes: int = 0

    @property
    def max_error(self) -> float:
        return max((e.relative_error for e in self.layers), default=0.0)

    @property
    def ranks(self) -> tuple[int, int]:
        ranks = [e.rank for e in self.layers]
        return (min(ranks), max(ranks)) if ranks else (0, 0)

    def to_dict(self) -> dict:
        return {
            "format": self.format, "rank": self.rank, "energy": self.energy, "path": str(self.path) if self.path else None,
            "bytes": self.bytes, "num_values": self.num_values, "overall_relative_error": self.overall_error,
            "max_layer_relative_error": self.max_error,
            "layers": [{"name": e.name, "rank": e.rank, "relative_error": e.relative_error} for e in self.layers],
        }


def load_adapter(source) -> "SuperLoRAFile":
    """A parsed adapter from a `SuperLoRAFile`, a `.safetensors` file or a folder holding one."""
    from .serialization import SuperLoRAFile, parse_superlora, read_superlora_file, resolve_weight_file

    if isinstance(source, SuperLoRAFile):
        return source
    path = resolve_weight_file(source)
    tensors, metadata = read_superlora_file(path)
    return parse_superlora(tensors, metadata, repr(str(path)))


@torch.no_grad()
def adapter_deltas(source) -> dict[str, torch.Tensor]:
    """`{target name: ΔW}` (fp32, scaled by alpha/rank, weight 1) in super-vector order: no base model needed."""
    adapter = load_adapter(source)
    module = adapter.build().eval()
    return {name: delta.detach().float() for (name, _), delta in zip(adapter.targets, module())}


def export_state_dict(source, to: str = "lora", rank: int | None = None, energy: float | None = None,
                      dtype: torch.dtype | str = torch.float32
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str], ExportReport]:
    """(tensors, safetensors header, report) of an adapter exported as `lora` (diffusers/peft keys), `kohya`
    (`lora_unet_...` down/up/alpha) or `diff` (exact full ΔW). The SVD formats take `rank` or `energy`."""
    import json

    from . import __version__

    if to not in FORMATS:
        raise ExportError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}.")
    token = load_adapter(source).config.token
    if token is not None:  # a LoRA/kohya/diff file has no place for it: refuse rather than drop it silently
        raise ExportError(
            f"this adapter also trains the embedding of {token!r} (pivotal tuning), which {to} files cannot hold; "
            "load the adapter itself with load_superlora_weights, or bake both into a model with `superlora merge`."
        )
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    if to == "diff":
        if rank is not None or energy is not None:
            raise ExportError("the diff export is exact (full ΔW): it takes no --rank or --energy.")
    else:
        if rank is not None and energy is not None:
            raise ExportError("pass --rank or --energy, not both.")
        if rank is not None and rank < 1:
            raise ExportError(f"rank must be a positive integer, got {rank}.")
        if energy is not None and not 0 < energy <= 1:
            raise ExportError(f"energy must be in (0, 1] (e.g. 0.99 keeps 99% of Σσ²), got {energy}.")
        if rank is None and energy is None:
            raise ExportError("the SVD export needs --rank R or --energy E (e.g. --rank 16 or --energy 0.99).")
    adapter = load_adapter(source)
    deltas = adapter_deltas(adapter)
    kernels = json.loads(adapter.metadata.get("target_kernels", "{}"))
    if to == "diff":
        state = to_diff_state_dict(deltas, kernels)
        errors = [LayerError(name, min(d.shape), 0.0) for name, d in deltas.items()]
        if dtype != torch.float32:  # rounding is the only loss: report it
            errors = [LayerError(e.name, e.rank, _relative(deltas[e.name], deltas[e.name].to(dtype))) for e in errors]
    else:
        state, errors = to_lora_state_dict(deltas, rank=rank, energy=energy, kohya=to == "kohya", kernels=kernels)
    state = {k: (v.to(dtype) if v.is_floating_point() and v.dim() > 0 else v).contiguous() for k, v in state.items()}
    report = ExportReport(to, errors, overall_error(deltas, errors), sum(v.numel() for v in state.values()), rank, energy)
    summary = {
        "source_format": "superlora", "source_fingerprint": adapter.metadata.get("base_fingerprint", ""),
        "export_format": to, "rank": rank, "energy": energy, "dtype": str(dtype).replace("torch.", ""),
        "overall_relative_error": report.overall_error, "max_layer_relative_error": report.max_error,
        "library_version": __version__,
    }
    metadata = {"format": "pt", "superlora_export": json.dumps(summary)}
    prompt = adapter.metadata.get("instance_prompt")
    if to == "kohya":
        alpha = max(report.ranks)
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(alpha),
                         "ss_network_alpha": str(alpha), "ss_training_comment": "exported from a SuperLoRA by SVD"})
    elif to == "diff":
        metadata.update({"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"}),
                         "ss_training_comment": "exact full ΔW exported from a SuperLoRA"})
    if prompt and to != "lora":
        metadata["modelspec.trigger_phrase"] = prompt
    return state, metadata, report


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = float(a.double().norm())
    return float((a.double() - b.double()).norm()) / norm if norm > 0 else 0.0


def default_export_path(adapter_path: str | Path, to: str, rank: int | None = None, energy: float | None = None) -> Path:
    """Beside the adapter: diffusers' `pytorch_lora_weights.safetensors` (so `pipe.load_lora_weights(folder)`
    finds it), `<stem>_kohya_r16.safetensors` / `_e0.99`, `<stem>_diff.safetensors`."""
    from .serialization import resolve_weight_file

    path = resolve_weight_file(adapter_path)
    if to == "lora":
        return path.parent / DIFFUSERS_LORA_NAME
    suffix = "_diff" if to == "diff" else f"_kohya_{'r' + str(rank) if rank is not None else 'e' + str(energy)}"
    return path.parent / f"{path.stem}{suffix}.safetensors"


def export_adapter(source, out: str | Path | None = None, to: str = "lora", rank: int | None = None,
                   energy: float | None = None, dtype: torch.dtype | str = torch.float32,
                   overwrite: bool = False) -> ExportReport:
    """Export an adapter file to `out` (a file, or a folder for the default name) atomically; refuse to replace
    an existing file unless `overwrite`. Returns the report (per-layer and overall error, size)."""
    from safetensors.torch import save

    from .serialization import atomic_write_bytes

    if out is None:
        if not isinstance(source, (str, Path)):
            raise ExportError("pass an output path: the adapter has no file to export beside.")
        out = default_export_path(source, to, rank, energy)
    out = Path(out)
    if out.is_dir():
        out = out / (DIFFUSERS_LORA_NAME if to == "lora" else f"superlora_{to}.safetensors")
    if out.suffix != ".safetensors":
        raise ExportError(f"output {str(out)!r} must end in .safetensors (or be an existing folder).")
    if out.exists() and not overwrite:
        raise ExportError(f"{str(out)!r} already exists; pass --force to replace it or choose another --out.")
    state, metadata, report = export_state_dict(source, to, rank, energy, dtype)
    atomic_write_bytes(out, save(state, metadata=metadata))
    report.path, report.bytes = out, out.stat().st_size
    return report


def load_base_pipeline(base: str, torch_dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from `toy`, a local folder or a Hub id, with one-line errors."""
    import warnings

    from diffusers import DiffusionPipeline

    from .toy import resolve_base_model

    try:
        path = resolve_base_model(base)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    if not Path(path).exists() and (path.count("/") != 1 or path.startswith((".", "/", "~"))):
        raise ExportError(f"base model {path!r} not found: pass a diffusers folder (with model_index.json), a Hub id, or 'toy'.")
    if Path(path).is_dir() and not (Path(path) / "model_index.json").is_file():
        raise ExportError(f"{path!r} is not a diffusers pipeline folder (no model_index.json).")
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renamed torch_dtype to dtype; older ones know only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=torch_dtype)
    except Exception as e:  # noqa: BLE001 (missing files, offline hub, bad config: one message for all)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot load base model {path!r}: {reason}") from None
    if getattr(pipe, "unet", None) is None:
        raise ExportError(f"{path!r} is a {type(pipe).__name__} without a UNet; SuperLoRA adapts UNet pipelines.")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_into(pipe, source, parsed: "SuperLoRAFile | None" = None) -> str:
    """`pipe.load_superlora_weights` from a path (errors name the file) or an already parsed adapter."""
    from .serialization import PREFIX, resolve_weight_file

    if isinstance(source, (str, Path)):
        return pipe.load_superlora_weights(resolve_weight_file(source))
    parsed = parsed or load_adapter(source)
    return pipe.load_superlora_weights({PREFIX + k: v for k, v in parsed.state_dict.items()}, metadata=parsed.metadata)


def stored_dtype(base_dir: str | Path) -> torch.dtype:
    """The dtype the base UNet's weights are stored in (float32 when it cannot tell)."""
    from safetensors import safe_open

    files = sorted((Path(base_dir) / "unet").glob("*.safetensors")) if Path(base_dir).is_dir() else []
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                return names.get(f.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


def merge_adapter(adapter, base: str, out_dir: str | Path, scale: float = 1.0, dtype: str = "auto",
                  overwrite: bool = False) -> Path:
    """Write a full diffusers pipeline folder with the adapter fused in (W + scale·ΔW), loadable by plain
    diffusers. Fuses in fp32, saves in `dtype` ("auto": the dtype the base's UNet is stored in). The folder
    is written beside `out_dir` under a temporary name and renamed at the end; an existing `out_dir` is
    refused unless `overwrite`."""
    import json
    import shutil
    import tempfile

    from .components import remove_superlora
    from .serialization import umask_mode
    from .toy import resolve_base_model

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{str(out)!r} already exists; pass --force to replace it or choose another --out.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{str(out)!r} exists and is not a folder; choose another --out.")
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}.")
    parsed = load_adapter(adapter)  # validate the adapter before loading a big base model
    pipe = load_base_pipeline(base)
    load_into(pipe, adapter, parsed)
    pipe.fuse_superlora(scale)
    remove_superlora(pipe._superlora_components(), keep_fused=True)  # plain layers and weights, as diffusers saves them
    try:
        base_path = resolve_base_model(base)
    except FileNotFoundError:
        base_path = base
    target_dtype = stored_dtype(base_path) if dtype == "auto" else DTYPES[dtype]
    if target_dtype != torch.float32:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" is noise here
        try:
            pipe.to(dtype=target_dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(umask_mode(0o777))  # mkdtemp makes 0700; the merged folder is an ordinary model folder
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "superlora_merge.json").write_text(json.dumps({
            "base": str(base), "scale": scale, "dtype": str(target_dtype).replace("torch.", ""),
            "adapter_config": parsed.config.to_dict(), "adapter_fingerprint": parsed.metadata.get("base_fingerprint"),
            "adapter_metadata": {k: v for k, v in parsed.metadata.items() if k not in ("config", "targets")},
        }, indent=1))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def adapter_info(source) -> dict:
    """What `superlora inspect` prints: config, targets, parameter count, bytes, base-model fingerprint."""
    from .serialization import resolve_weight_file
    from .superlora import lora_parameter_count

    path = None if not isinstance(source, (str, Path)) else resolve_weight_file(source)
    adapter = load_adapter(path if path is not None else source)
    shapes = adapter.shapes
    n_params = sum(v.numel() for v in adapter.state_dict.values())
    lora1 = lora_parameter_count(shapes, rank=1)
    components: dict[str, int] = {}
    for name, _ in adapter.targets:
        component = name.split(".", 1)[0]
        components[component] = components.get(component, 0) + 1
    header = {"format", "format_version", "config", "targets", "base_fingerprint", "library_version", "num_parameters"}
    return {
        "path": str(path) if path is not None else None,
        "bytes": path.stat().st_size if path is not None else None,
        "format_version": int(adapter.metadata.get("format_version", 1)),
        "library_version": adapter.metadata.get("library_version"),
        "config": adapter.config.to_dict(),
        "num_parameters": n_params,
        "num_targets": len(adapter.targets),
        "targets_per_component": components,
        "targets": [[name, o, i] for name, (o, i) in adapter.targets],
        "adapted_entries": sum(o * i for o, i in shapes),
        "lora_rank1_parameters": lora1,
        "base_fingerprint": adapter.metadata.get("base_fingerprint"),
        "metadata": {k: v for k, v in adapter.metadata.items() if k not in header},
    }


def check_base(source, base: str) -> str:
    """Load `base` and check that every target of the adapter exists there with its shape; returns the base's
    path. Raises `SuperLoRAFileError` naming the first layer that does not fit."""
    from .toy import resolve_base_model

    adapter = load_adapter(source)
    pipe = load_base_pipeline(base)
    pipe._resolve_targets(adapter, "the adapter")
    try:
        return resolve_base_model(base)
    except FileNotFoundError:
        return base
