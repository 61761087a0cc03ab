"""`pipe.load_superlora_weights(...)` and its sibling verbs, as diffusers' LoRA loader mixins do them.

`import superlora_diffusers` attaches `SuperLoRALoaderMixin`'s methods to `diffusers.DiffusionPipeline`,
so every pipeline with a UNet (and optional text encoders: SD 1.x/2.x, SDXL) gets them. Each verb is one
method here; the work happens in `components.py` (one adapter over the pipeline's models, through peft) and
`serialization.py` (the file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import components as parts
from .tuner import SharedGenerator
from .serialization import (
    WEIGHT_NAME,
    SuperLoRAFile,
    SuperLoRAFileError,
    parse_superlora,
    read_superlora_file,
    resolve_weight_file,
    save_superlora_file,
    serialize,
)
from .superlora import lora_parameter_count
from .targets import COMPONENTS, Target, layer_shape, unwrap
from .tokens import token_ids_for


class SuperLoRALoaderMixin:
    """Load, save, mix, fuse and unload SuperLoRA adapters on a diffusers pipeline."""

    # ---- helpers ------------------------------------------------------------------------------------
    def _superlora_components(self) -> dict[str, torch.nn.Module]:
        components = {name: getattr(self, name, None) for name in COMPONENTS}
        if components["unet"] is None:
            raise ValueError(f"{type(self).__name__} has no UNet; SuperLoRA supports UNet pipelines (SD 1.x/2.x, SDXL).")
        return {k: v for k, v in components.items() if v is not None}

    def _superlora_generators(self) -> dict[str, SharedGenerator]:
        generators = parts.find_generators(self._superlora_components())
        if not generators:
            raise ValueError("no SuperLoRA is loaded; call pipe.load_superlora_weights(...) first.")
        return generators

    def _resolve_targets(self, parsed: SuperLoRAFile, source: str) -> list[Target]:
        """The pipeline's layers for the file's targets; the first missing or mis-shaped one is an error."""
        components = self._superlora_components()
        targets = []
        for name, shape in parsed.targets:
            layer = _find_layer(components, name)
            if layer is None:
                raise SuperLoRAFileError(
                    f"{source} adapts {name}, which this pipeline does not have; it was trained for another base model."
                )
            have = layer_shape(layer) if hasattr(layer, "weight") else (None, None)
            if have != tuple(shape):
                raise SuperLoRAFileError(
                    f"{source} was trained for another base model: {name} is {have[0]}x{have[1]} here but "
                    f"{shape[0]}x{shape[1]} in the file."
                )
            targets.append(Target(name, layer))
        return targets

    def _check_token(self, parsed: SuperLoRAFile, source: str) -> None:
        """Pivotal tuning: the adapter's word must tokenize to the same ids, of the same width, in this pipeline."""
        config = parsed.config
        if config.token is None:
            return
        tokenizer, encoder = getattr(self, "tokenizer", None), getattr(self, "text_encoder", None)
        if tokenizer is None or encoder is None:
            raise SuperLoRAFileError(f"{source} trains the embedding of {config.token!r}, but this pipeline has no "
                                     "tokenizer and text_encoder.")
        ids, dim = token_ids_for(tokenizer, config.token), encoder.get_input_embeddings().weight.shape[1]
        if tuple(ids) != config.token_ids or dim != config.token_dim:
            raise SuperLoRAFileError(
                f"{source} was trained for another base model: its word {config.token!r} is token ids "
                f"{list(config.token_ids)} of width {config.token_dim} there, {ids} of width {dim} here."
            )

    @staticmethod
    def superlora_state_dict(path: str | os.PathLike, weight_name: str | None = None
                             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(factors, header metadata) of an adapter file or folder, unvalidated."""
        return read_superlora_file(resolve_weight_file(path, weight_name))

    # ---- the verbs ----------------------------------------------------------------------------------
    def load_superlora_weights(self, path_or_dir_or_state_dict: str | os.PathLike | dict[str, torch.Tensor],
                               weight_name: str | None = None, adapter_name: str | None = None,
                               metadata: dict[str, str] | None = None, hotswap: bool = False) -> str:
        """Load an adapter (a folder, a `.safetensors` file, a Hub repo id, or a state dict with `metadata=`)
        and activate it with weight 1.0; returns its adapter name.

        `hotswap=True` (diffusers' name) replaces the factors of the loaded adapter `adapter_name` in place with
        the file's, which must have the same layout: nothing is re-injected, its weight stays, and the same
        parameter tensors hold the new values. Everything is validated before the pipeline is touched: a failed
        load leaves it exactly as it was.
        """
        if isinstance(path_or_dir_or_state_dict, dict):
            if metadata is None:
                raise SuperLoRAFileError("a state dict needs its header: pass metadata= (from pipe.superlora_state_dict(path)).")
            state_dict, source = path_or_dir_or_state_dict, "the state dict"
        else:
            path = resolve_weight_file(path_or_dir_or_state_dict, weight_name)
            state_dict, metadata = read_superlora_file(path)
            source = repr(str(path))
        parsed = parse_superlora(state_dict, metadata, source)
        targets = self._resolve_targets(parsed, source)
        self._check_token(parsed, source)
        components = self._superlora_components()
        generators = parts.find_generators(components)
        if hotswap:
            if adapter_name is None:
                raise ValueError("hotswap=True replaces a loaded adapter: pass its adapter_name.")
            return _hotswap(generators, adapter_name, parsed, targets, source)
        if adapter_name is None:
            adapter_name = next(f"default_{i}" for i in range(len(generators) + 1) if f"default_{i}" not in generators)
        if adapter_name in generators:
            raise ValueError(f"adapter name {adapter_name!r} is already loaded; pass another adapter_name, unload it "
                             "first, or replace its factors with hotswap=True.")
        generator = parts.inject_superlora(components, parsed.config, adapter_name, parsed.metadata, targets)
        generator.load_state_dict(parsed.state_dict)
        return adapter_name

    def save_superlora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                               weight_name: str = WEIGHT_NAME, overwrite: bool = False,
                               metadata: dict[str, str] | None = None) -> Path:
        """Write one adapter (default: the only one loaded) to `save_directory/weight_name`, atomically."""
        generator = self._single_adapter(adapter_name)[1]
        extra = {k: v for k, v in generator.metadata.items() if k not in _HEADER_FIELDS}
        extra.update(metadata or {})
        return save_superlora_file(Path(save_directory) / weight_name, generator, generator.targets, extra, overwrite)

    def set_superlora_adapters(self, adapter_names: str | list[str],
                               adapter_weights: float | dict[str, float] | list[float | dict[str, float]] | None = None
                               ) -> None:
        """Activate these adapters (all others off, a peft LoRA too, as diffusers' `set_adapters` does), each with its
        weight (default 1.0): a float, or a dict per component, e.g. {"unet": 0.8, "text_encoder": 1.0} (omitted
        ones 1.0). SuperLoRA names are checked here; then diffusers' `set_adapters` does the work."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float, dict)):
            weights = [adapter_weights] * len(names)
        else:
            weights = list(adapter_weights)
        components = self._superlora_components()
        self._check_superlora_names(names)
        if len(names) != len(weights):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights; pass one weight per adapter.")
        for name, weight in zip(names, weights):
            unknown = sorted(set(weight) - set(components)) if isinstance(weight, dict) else []
            if unknown:
                raise ValueError(f"adapter {name!r}: unknown component {unknown[0]!r} in its weight dict; "
                                 f"use {', '.join(repr(c) for c in components)}.")
        self.set_adapters(names, [dict(w) if isinstance(w, dict) else float(w) for w in weights])

    def get_active_superlora_adapters(self) -> dict[str, float | dict[str, float]]:
        """Active SuperLoRA -> its weight: a float, or a dict per component where they differ."""
        components = self._superlora_components()
        active = parts.active_adapters(components)
        out: dict[str, float | dict[str, float]] = {}
        for name in parts.find_generators(components):
            if name in active:
                weights = parts.adapter_weights(components, name)
                out[name] = next(iter(weights.values())) if len(set(weights.values())) == 1 else weights
        return out

    def get_list_superlora_adapters(self) -> list[str]:
        return list(parts.find_generators(self._superlora_components()))

    def delete_superlora_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_superlora_names(names)
        components = self._superlora_components()
        if any(layer.merged for _, layer in parts.superlora_layers(components)):
            raise ValueError("a SuperLoRA is fused; call unfuse_superlora() before deleting an adapter.")
        for name in names:
            parts.delete_superlora(components, name)
        if not parts.find_generators(components):
            parts.remove_superlora(components)

    def fuse_superlora(self, scale: float = 1.0) -> None:
        """Bake scale · (weighted sum of active adapters' ΔW) into the base weights: zero inference overhead."""
        self._superlora_generators()
        parts.fuse(self._superlora_components(), scale)

    def unfuse_superlora(self) -> None:
        """Restore the base weights bit-for-bit (the originals were kept at fuse time)."""
        self._superlora_generators()
        if any(parts._fused_qkv(m) for m in self.unet.modules() if hasattr(m, "processor")):
            raise RuntimeError("fused QKV projections were built from the fused SuperLoRA weights; call "
                               "pipe.unfuse_qkv_projections() before pipe.unfuse_superlora().")
        parts.unfuse(self._superlora_components())

    def unload_superlora_weights(self) -> None:
        """Remove every SuperLoRA: the pipeline is back to the untouched base (fused weights restored); a peft LoRA
        loaded beside them stays."""
        parts.remove_superlora(self._superlora_components())

    def disable_superlora(self) -> None:
        self._superlora_generators()
        parts.set_enabled(self._superlora_components(), False)

    def enable_superlora(self) -> None:
        self._superlora_generators()
        parts.set_enabled(self._superlora_components(), True)

    def get_superlora_info(self, adapter_name: str | None = None) -> dict[str, Any]:
        """Trainable parameters, file bytes, config, targets, and a rank-1 LoRA's count for the same targets."""
        name, generator = self._single_adapter(adapter_name)
        shapes = generator.shapes
        n_params = generator.num_parameters()
        lora1 = lora_parameter_count(shapes, rank=1)
        extra = {k: v for k, v in generator.metadata.items() if k not in _HEADER_FIELDS}
        return {
            "adapter_name": name,
            "num_parameters": n_params,
            "file_bytes": len(serialize(generator, generator.targets, extra)),
            "config": generator.config.to_dict(),
            "targets": list(generator.targets),
            "adapted_entries": sum(o * i for o, i in shapes),
            "lora_rank1_parameters": lora1,
            "lora_rank1_ratio": lora1 / n_params,
            "weight": self.get_active_superlora_adapters().get(name, 0.0),
            "metadata": extra,
        }

    # ---- internals ----------------------------------------------------------------------------------
    def _single_adapter(self, adapter_name: str | None) -> tuple[str, SharedGenerator]:
        """(name, generator) of `adapter_name`, or of the only adapter loaded when it is None."""
        return _pick_adapter(self._superlora_generators(), adapter_name)

    def _check_superlora_names(self, names: list[str]) -> None:
        """Each name must be a loaded SuperLoRA: the adapters are read once for all (not at all for no names)."""
        generators = self._superlora_generators() if names else {}
        for name in names:
            _pick_adapter(generators, name)


def _pick_adapter(generators: dict[str, SharedGenerator], adapter_name: str | None) -> tuple[str, SharedGenerator]:
    """(name, generator) of `adapter_name` among `generators`, or of the only one when it is None."""
    if adapter_name is not None:
        if adapter_name not in generators:
            raise ValueError(f"no SuperLoRA adapter named {adapter_name!r}; loaded: {sorted(generators)}.")
        return adapter_name, generators[adapter_name]
    if len(generators) > 1:
        raise ValueError(f"several SuperLoRAs are loaded ({sorted(generators)}); pass adapter_name=.")
    return next(iter(generators.items()))


def _hotswap(generators: dict[str, SharedGenerator], adapter_name: str, parsed: SuperLoRAFile, targets: list[Target],
             source: str) -> str:
    """Copy a file's factors into the loaded adapter of the same layout, in place (compiled graphs read them by
    reference, so nothing recompiles)."""
    generator = generators.get(adapter_name)
    if generator is None:
        raise ValueError(f"hotswap=True replaces a loaded adapter, and {adapter_name!r} is not loaded; load it first "
                         "or drop hotswap.")
    if parsed.config.to_dict() != generator.config.to_dict() or [t.name for t in targets] != generator.targets:
        raise SuperLoRAFileError(f"{source} has another layout than adapter {adapter_name!r} (its config or targets "
                                 "differ); hotswap needs the same layout, so load it under another adapter_name.")
    with torch.no_grad():
        generator.load_state_dict(parsed.state_dict)  # copies into the same tensors
    generator.metadata = parsed.metadata
    return adapter_name


def _find_layer(components: dict[str, torch.nn.Module], name: str) -> torch.nn.Module | None:
    """The layer a target name points to; CLIP paths with and without `text_model.` (transformers 4 vs 5) both match."""
    component, _, path = name.partition(".")
    if component not in components:
        return None
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        try:
            return unwrap(components[component].get_submodule(candidate))
        except AttributeError:
            continue
    return None


_HEADER_FIELDS = {"format", "format_version", "config", "targets", "base_fingerprint", "library_version", "num_parameters"}


def attach() -> None:
    """Give every diffusers pipeline the SuperLoRA verbs (idempotent)."""
    from diffusers import DiffusionPipeline

    for name, value in vars(SuperLoRALoaderMixin).items():
        if not name.startswith("__"):
            setattr(DiffusionPipeline, name, value)
