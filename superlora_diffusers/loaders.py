"""`pipe.load_superlora_weights(...)` and its sibling verbs, as diffusers' LoRA loader mixins do them.

`import superlora_diffusers` attaches `SuperLoRALoaderMixin`'s methods to `diffusers.DiffusionPipeline`,
so every pipeline with a UNet (and optional text encoders: SD 1.x/2.x, SDXL) gets them. Each verb is one
method here; the work happens in `model.py` (injection) and `serialization.py` (the file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .model import SuperLoRAModel, get_superlora_model, remove_superlora
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

    def _superlora_model(self) -> SuperLoRAModel:
        model = get_superlora_model(self._superlora_components())
        if model is None or not model.adapters:
            raise ValueError("no SuperLoRA is loaded; call pipe.load_superlora_weights(...) first.")
        return model

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
        ids, dim = token_ids_for(tokenizer, config.token), encoder.get_input_embeddings().embedding_dim
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
        existing = get_superlora_model(components)
        if adapter_name is None and hotswap:
            raise ValueError("hotswap=True replaces a loaded adapter: pass its adapter_name.")
        if adapter_name is None:
            taken = set(existing.adapters) if existing else set()
            adapter_name = next(f"default_{i}" for i in range(len(taken) + 1) if f"default_{i}" not in taken)
        if existing is not None and existing.originals is not None:
            raise ValueError("a SuperLoRA is fused; call pipe.unfuse_superlora() before loading another adapter.")
        if hotswap:
            return _hotswap(existing, adapter_name, parsed, targets, source)
        if existing is not None and adapter_name in existing.adapters:
            raise ValueError(f"adapter name {adapter_name!r} is already loaded; pass another adapter_name, unload it "
                             "first, or replace its factors with hotswap=True.")
        module = parsed.build().to(targets[0].module.weight.device)
        model = get_superlora_model(components, create=True)
        model.add_adapter(adapter_name, module, targets, parsed.metadata)
        self._wrap_encode_prompt(model)
        return adapter_name

    def save_superlora_weights(self, save_directory: str | os.PathLike, adapter_name: str | None = None,
                               weight_name: str = WEIGHT_NAME, overwrite: bool = False,
                               metadata: dict[str, str] | None = None) -> Path:
        """Write one adapter (default: the only one loaded) to `save_directory/weight_name`, atomically."""
        model = self._superlora_model()
        name = self._single_adapter(model, adapter_name)
        adapter = model.adapters[name]
        extra = {k: v for k, v in adapter.metadata.items() if k not in _HEADER_FIELDS}
        extra.update(metadata or {})
        return save_superlora_file(Path(save_directory) / weight_name, adapter.module, adapter.targets, extra, overwrite)

    def set_superlora_adapters(self, adapter_names: str | list[str],
                               adapter_weights: float | dict[str, float] | list[float | dict[str, float]] | None = None
                               ) -> None:
        """Activate these adapters (all others off), each with its weight (default 1.0): a float, or a dict per
        component as in diffusers' `set_adapters`, e.g. {"unet": 0.8, "text_encoder": 1.0} (omitted ones 1.0)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float, dict)):
            weights = [adapter_weights] * len(names)
        else:
            weights = list(adapter_weights)
        self._superlora_model().set_adapters(names, weights)

    def get_active_superlora_adapters(self) -> dict[str, float | dict[str, float]]:
        """Active adapter -> its weight as set: a float, or the per-component dict."""
        model = get_superlora_model(self._superlora_components())
        return {name: dict(w) if isinstance(w, dict) else w for name, w in model.weights.items()} if model else {}

    def get_list_superlora_adapters(self) -> list[str]:
        model = get_superlora_model(self._superlora_components())
        return list(model.adapters) if model else []

    def delete_superlora_adapters(self, adapter_names: str | list[str]) -> None:
        model = self._superlora_model()
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            model.delete_adapter(name)
        if not model.adapters:
            self.unload_superlora_weights()

    def fuse_superlora(self, scale: float = 1.0) -> None:
        """Bake scale · (weighted sum of active adapters' ΔW) into the base weights: zero inference overhead."""
        self._superlora_model().fuse(scale)

    def unfuse_superlora(self) -> None:
        """Restore the base weights bit-for-bit (the originals were kept at fuse time)."""
        model = self._superlora_model()
        for layer in model.layers.values():
            processor = getattr(layer.parent, "processor", None)
            if processor is not None and "Fused" in type(processor).__name__:
                raise RuntimeError("fused QKV projections were built from the fused SuperLoRA weights; call "
                                   "pipe.unfuse_qkv_projections() before pipe.unfuse_superlora().")
        model.unfuse()

    def unload_superlora_weights(self) -> None:
        """Remove every SuperLoRA: the pipeline is back to the untouched base (fused weights restored)."""
        remove_superlora(self._superlora_components())
        if "encode_prompt" in vars(self):
            del self.encode_prompt

    def disable_superlora(self) -> None:
        self._superlora_model().enabled = False

    def enable_superlora(self) -> None:
        self._superlora_model().enabled = True

    def get_superlora_info(self, adapter_name: str | None = None) -> dict[str, Any]:
        """Trainable parameters, file bytes, config, targets, and a rank-1 LoRA's count for the same targets."""
        model = self._superlora_model()
        name = self._single_adapter(model, adapter_name)
        adapter = model.adapters[name]
        shapes = adapter.module.shapes
        n_params = adapter.module.num_parameters()
        lora1 = lora_parameter_count(shapes, rank=1)
        extra = {k: v for k, v in adapter.metadata.items() if k not in _HEADER_FIELDS}
        return {
            "adapter_name": name,
            "num_parameters": n_params,
            "file_bytes": len(serialize(adapter.module, adapter.targets, extra)),
            "config": adapter.config.to_dict(),
            "targets": list(adapter.targets),
            "adapted_entries": sum(o * i for o, i in shapes),
            "lora_rank1_parameters": lora1,
            "lora_rank1_ratio": lora1 / n_params,
            "weight": model.weights.get(name, 0.0),
            "metadata": extra,
        }

    # ---- internals ----------------------------------------------------------------------------------
    @staticmethod
    def _single_adapter(model: SuperLoRAModel, adapter_name: str | None) -> str:
        if adapter_name is not None:
            model._require(adapter_name)
            return adapter_name
        if len(model.adapters) > 1:
            raise ValueError(f"several SuperLoRAs are loaded ({sorted(model.adapters)}); pass adapter_name=.")
        return next(iter(model.adapters))

    def _wrap_encode_prompt(self, model: SuperLoRAModel) -> None:
        """diffusers hands `cross_attention_kwargs["scale"]` to the text encoders as `encode_prompt(lora_scale=)`
        and applies it to peft layers only; route it to the SuperLoRA's text-encoder targets too."""
        original = getattr(type(self), "encode_prompt", None)
        if original is None or "encode_prompt" in vars(self):
            return

        def encode_prompt(*args: Any, **kwargs: Any):
            with model.text_scale(kwargs.get("lora_scale")):
                return original(self, *args, **kwargs)

        self.encode_prompt = encode_prompt


def _hotswap(model: SuperLoRAModel | None, adapter_name: str, parsed: SuperLoRAFile, targets: list[Target],
             source: str) -> str:
    """Copy a file's factors into the loaded adapter of the same layout, in place."""
    if model is None or adapter_name not in model.adapters:
        raise ValueError(f"hotswap=True replaces a loaded adapter, and {adapter_name!r} is not loaded; load it first "
                         "or drop hotswap.")
    adapter = model.adapters[adapter_name]
    if parsed.config.to_dict() != adapter.config.to_dict() or [t.name for t in targets] != adapter.targets:
        raise SuperLoRAFileError(f"{source} has another layout than adapter {adapter_name!r} (its config or targets "
                                 "differ); hotswap needs the same layout, so load it under another adapter_name.")
    with torch.no_grad():
        adapter.module.load_state_dict(parsed.state_dict)  # copies into the same tensors
    adapter.metadata = parsed.metadata
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
