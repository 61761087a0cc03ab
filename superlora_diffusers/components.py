"""One SuperLoRA over several models of a pipeline: the UNet owns the generator, the text encoders read it.

`inject_superlora` builds the generator over every target of every component (the layout needs all shapes in
one fixed order), registers it once in the UNet (`unet.superlora_generator.<adapter>`, so `.to()`, `state_dict`,
DDP and optimisers see each factor once), and injects the adapter into each component with peft's
`inject_adapter_in_model`, the text encoders' tuner reading the UNet's generator (`tuner.sharing`). From there
on diffusers' and peft's own machinery drives the layers: `set_adapters` (per-component weights included), the
call-time scale of the UNet and of `encode_prompt` on any pipeline (`from_pipe` ones too), `fuse_lora`,
`delete_adapters`. The functions below are what those verbs do not cover: the adapter as one object across
components (its generator, its layers), exact fusing of SuperLoRAs only, and removing them without touching a
peft LoRA loaded beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from typing import Iterator

from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import SuperLoRAConfig
from .layout import Shape
from .targets import Target, find_targets, unwrap
from .tuner import GENERATORS, TOKEN_SLOT, SharedGenerator, SuperLoRALayer, sharing

Components = dict[str, nn.Module]


def target_shapes(components: Components, target_modules: str | list[str]) -> list[Shape]:
    return [t.shape for t in find_targets(components, target_modules)]


def target_kernels(components: Components, target_modules: str | list[str]) -> list[int]:
    """k_h·k_w of each target (1 for a Linear): what `kernel_axis` counts parameters with."""
    return [t.kernel_numel for t in find_targets(components, target_modules)]


def find_generators(components: Components) -> dict[str, SharedGenerator]:
    """Loaded SuperLoRA adapters by name (in load order), each its generator."""
    return dict(getattr(components["unet"], GENERATORS, None) or {})


def superlora_layers(components: Components) -> Iterator[tuple[str, SuperLoRALayer]]:
    """(component, layer) of every SuperLoRA tuner layer of the pipeline."""
    for component, model in components.items():
        for module in model.modules():
            if isinstance(module, SuperLoRALayer):
                yield component, module


def inject_superlora(components: Components, config: SuperLoRAConfig, adapter_name: str = "default",
                     metadata: dict[str, str] | None = None, targets: list[Target] | None = None) -> SharedGenerator:
    """Build a fresh (ΔW = 0) SuperLoRA over `targets` (default: `config.target_modules` resolved on the
    components), inject it into each component it adapts, activate it at weight 1.0 beside the adapters already
    active, and return its generator (the trainable module)."""
    unet = components["unet"]
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name {adapter_name!r} cannot be used: peft keeps adapters in module dicts, whose "
                         "keys are non-empty and have no '.'; use e.g. 'sks_star'.")
    if any(adapter_name in getattr(m, "peft_config", {}) for m in components.values()):
        raise ValueError(f"adapter name {adapter_name!r} is already loaded; pass another adapter_name or unload it first.")
    if any(layer.merged for _, layer in superlora_layers(components)):
        raise ValueError("a SuperLoRA is fused; call unfuse_superlora() before loading another adapter.")
    targets = targets if targets is not None else find_targets(components, config.target_modules)
    slots = _slots(components, config, targets)
    active = active_adapters(components)
    generator = SharedGenerator(config, [t.shape for t in targets], [t.kernel_numel for t in targets])
    generator = generator.to(targets[0].module.weight.device)
    generator.targets, generator.metadata = [t.name for t in targets], dict(metadata or {})
    kernels = {t.name: list(t.kernel_size) for t in targets if t.kernel_size is not None}
    if kernels:  # conv targets: exporters need the kernel shape back from the file
        generator.metadata["target_kernels"] = json.dumps(kernels)
    generator.attach(unet, adapter_name)
    for component, component_slots in slots.items():
        model = components[component]
        part = dataclasses.replace(config, target_modules=sorted(component_slots))
        with sharing(generator, component_slots), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Already found a `peft_config`")  # a second adapter: that is the point
            inject_adapter_in_model(part, model, adapter_name)
        model._hf_peft_config_loaded = True  # diffusers' and transformers' verbs check this flag
        if model is not unet:
            generator.follow(model)
    _activate(components, active + [adapter_name])
    generator.cache.hooks.append(unet.register_forward_pre_hook(_refuse_fused_qkv(unet)))
    return generator


def _slots(components: Components, config: SuperLoRAConfig, targets: list[Target]) -> dict[str, dict[str, int]]:
    """component -> {module path in that component: slot in the generator} (the input embeddings: TOKEN_SLOT)."""
    paths = {name: _paths(model) for name, model in components.items()}
    slots: dict[str, dict[str, int]] = {}
    for slot, target in enumerate(targets):
        slots.setdefault(target.component, {})[paths[target.component][id(unwrap(target.module))]] = slot
    if config.token is not None:
        encoder = components.get("text_encoder")
        if encoder is None:
            raise ValueError("this SuperLoRA trains a token embedding, but the pipeline has no text_encoder.")
        embeddings = id(unwrap(encoder.get_input_embeddings()))
        slots.setdefault("text_encoder", {})[paths["text_encoder"][embeddings]] = TOKEN_SLOT
    return slots


def _paths(model: nn.Module) -> dict[int, str]:
    """id(plain layer) -> its user-facing path in `model` (a peft wrapper's path, not its `base_layer`'s)."""
    paths: dict[int, str] = {}
    for key, module in model.named_modules():
        paths.setdefault(id(unwrap(module)), key)
    return paths


def active_adapters(components: Components) -> list[str]:
    """The active adapters of every peft layer of the pipeline, in order (SuperLoRA and peft LoRA alike)."""
    names: list[str] = []
    for model in components.values():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                names += [n for n in module.active_adapters if n not in names]
    return names


def _activate(components: Components, names: list[str]) -> None:
    for model in components.values():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(names)


def adapter_weights(components: Components, adapter_name: str) -> dict[str, float]:
    """The adapter's weight per component it adapts (its layers' `scaling`; 0 when it is inactive)."""
    weights = {}
    for component, layer in superlora_layers(components):
        if component not in weights and adapter_name in layer.scaling:
            weights[component] = layer.scaling[adapter_name] if adapter_name in layer.active_adapters else 0.0
    return weights


def set_enabled(components: Components, enabled: bool) -> list[SuperLoRALayer]:
    """Turn every SuperLoRA layer on or off with peft's `enable_adapters`, as diffusers' `enable_lora` /
    `disable_lora` do (a peft LoRA's layers stay as they are); switches and returns only the layers that were the
    other way, so `disabled` turns back exactly those."""
    switched = [layer for _, layer in superlora_layers(components) if layer.disable_adapters == enabled]
    for layer in switched:
        layer.enable_adapters(enabled)
    return switched


@contextlib.contextmanager
def disabled(components: Components) -> Iterator[None]:
    """Run the base model inside the block (the trainer's prior target), SuperLoRA layers only; layers that were
    already off stay off after it."""
    switched = set_enabled(components, False)
    try:
        yield
    finally:
        for layer in switched:
            layer.enable_adapters(True)


def fuse(components: Components, scale: float = 1.0) -> None:
    """Merge scale · weight · ΔW of every active SuperLoRA into the base weights (kept for an exact unfuse)."""
    layers = [layer for _, layer in superlora_layers(components)]
    if any(layer.merged for layer in layers):
        raise ValueError("a SuperLoRA is already fused; call unfuse_superlora() first.")
    for layer in layers:
        saved = dict(layer.scaling)
        layer.scaling.update({name: w * scale for name, w in saved.items()})
        try:
            layer.merge()
        finally:
            layer.scaling.update(saved)


def unfuse(components: Components) -> None:
    for _, layer in superlora_layers(components):
        layer.unmerge()


def delete_superlora(components: Components, adapter_name: str) -> None:
    """Remove one SuperLoRA from every layer and component; other adapters (LoRA too) stay as they are."""
    for _, layer in superlora_layers(components):
        if adapter_name in layer.superlora_slot:
            layer.delete_adapter(adapter_name)
    for model in components.values():
        getattr(model, "peft_config", {}).pop(adapter_name, None)
    generator = find_generators(components).get(adapter_name)
    if generator is not None:
        generator.detach()


def remove_superlora(components: Components, keep_fused: bool = False) -> None:
    """Unfuse and remove every SuperLoRA, putting each wrapped layer back (under a peft LoRA's wrapper too).

    `keep_fused=True` keeps what `fuse` merged into the base weights (peft's `merge_and_unload`): the plain model
    with the adapter baked in, as a merged export saves it."""
    if keep_fused:
        for _, layer in superlora_layers(components):
            layer.merged_adapters, layer.unmerged_weight = [], None
    unfuse(components)
    for name in find_generators(components):
        delete_superlora(components, name)
    for model in components.values():
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, SuperLoRALayer):
                    setattr(parent, child_name, child.base_layer)
        if hasattr(model, "peft_config") and not model.peft_config:
            del model.peft_config
            model._hf_peft_config_loaded = False
    if hasattr(components["unet"], GENERATORS):
        delattr(components["unet"], GENERATORS)


def _fused_qkv(attention: nn.Module) -> bool:
    """Whether diffusers' fused QKV processor (which reads `to_qkv`, not the q/k/v layers) runs this attention."""
    return "Fused" in type(getattr(attention, "processor", None)).__name__


def _refuse_fused_qkv(unet: nn.Module):
    """A UNet pre-forward hook: fused QKV projections skip the to_q/to_k/to_v layers, which would silently drop
    the SuperLoRA there, so a forward that would do that is refused, saying what to do instead."""
    attentions: dict[str, tuple[nn.Module, SuperLoRALayer]] = {}
    for key, module in unet.named_modules():
        parent, _, leaf = key.rpartition(".")
        if isinstance(module, SuperLoRALayer) and leaf in ("to_q", "to_k", "to_v") and parent not in attentions:
            attentions[parent] = (unet.get_submodule(parent), module)

    def hook(module: nn.Module, args: tuple) -> None:
        for path, (attention, layer) in attentions.items():
            if _fused_qkv(attention) and not (layer.merged or layer.disable_adapters):
                raise RuntimeError(
                    f"{path}'s q/k/v projections are bypassed by fused QKV projections, so the SuperLoRA would be "
                    "silently dropped; call pipe.unfuse_qkv_projections(), or pipe.fuse_superlora() first.")
    return hook
