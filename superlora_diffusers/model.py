"""Injection: every adapted projection reads its slice of the ΔW that one shared SuperLoRA generates.

Each model forward (UNet or text encoder) starts with a pre-hook on that component: it reads the call's
scale, and in training marks the ΔW stale so the next adapted layer regenerates the WHOLE super-vector
once, with autograd; at inference the ΔW is cached until a factor changes, so a 25-step denoising loop
generates it once. Every adapted projection then computes `x·(W + s·ΔW_l)ᵀ + b`. The one exception is
training a weight whose ΔW is a plain B·A (the LoRA preset): that layer computes `x·Wᵀ + s·x·Aᵀ·Bᵀ + b`, as
peft does, so no d_out × d_in ΔW or weight gradient is formed.

Why the projections and not attention processors: diffusers' processor-based LoRA was dropped because
every processor swap (`set_attn_processor`, xformers, slicing) silently lost it, and CLIP has no processor
hook (anchors §1). Patching the `nn.Linear` layers the processors call keeps the adapter under SDPA,
xformers, sliced and user-set processors, on the UNet and on CLIP alike. The one processor that skips
those layers (`fuse_qkv_projections`' fused one) is detected and refused with a clear error.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import SuperLoRAConfig
from .layout import Shape
from .superlora import SuperLoRA
from .targets import Target, find_targets


@dataclass
class Adapter:
    """One named SuperLoRA: its generator module and the ordered names of the weights it adapts."""

    module: SuperLoRA
    targets: list[str]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> SuperLoRAConfig:
        return self.module.config


class AdaptedLayer:
    """The patched forward of one adapted `nn.Linear` or `nn.Conv2d`: base weight plus the summed ΔW of its
    adapters (a conv's ΔW matrix (d_out, d_in·k_h·k_w) viewed as its kernel)."""

    def __init__(self, model: "SuperLoRAModel", target: Target, parent: nn.Module | None) -> None:
        self.model, self.name, self.layer, self.parent = model, target.name, target.module, parent
        self.component = target.component
        self.slots: dict[str, int] = {}  # adapter name -> index of this weight in that adapter's ΔW list
        self.is_conv = isinstance(self.layer, nn.Conv2d)  # x·Aᵀ·Bᵀ as two convs needs a plain zero-padded conv
        self.low_rank_ok = not self.is_conv or (self.layer.groups == 1 and self.layer.padding_mode == "zeros")
        self.layer.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta, low_rank = self.model.terms_for(self)
        weight = self.layer.weight
        if delta is not None:
            weight = weight + delta.view(weight.shape).to(weight.dtype)
        c = self.layer
        out = c._conv_forward(x, weight, c.bias) if self.is_conv else F.linear(x, weight, c.bias)
        for scale, b, a in low_rank:  # scale·x·Aᵀ·Bᵀ: for a conv, A as an r-channel kernel, then B as a 1x1 conv
            b, a = b.to(x.dtype), a.to(x.dtype)
            if self.is_conv:
                h = F.conv2d(x, a.reshape(a.shape[0], *c.weight.shape[1:]), None, c.stride, c.padding, c.dilation)
                out = out + scale * F.conv2d(h, b[..., None, None])
            else:
                out = out + scale * F.linear(F.linear(x, a), b)
        return out

    def remove(self) -> None:
        del self.layer.forward  # back to the class's own forward


class SuperLoRAModel:
    """The SuperLoRA adapters of one set of components (a pipeline's UNet and text encoders).

    Like peft's tuner models: it injects, holds named adapters and their weights, enables/disables,
    fuses/unfuses, and removes itself. It lives on the UNet as `unet._superlora` so every pipeline that
    shares the UNet sees it.
    """

    def __init__(self, components: dict[str, nn.Module]) -> None:
        self.components = {k: v for k, v in components.items() if v is not None}
        self.adapters: dict[str, Adapter] = {}
        self.weights: dict[str, float | dict[str, float]] = {}  # active adapters -> weight, or weight per component
        self.enabled = True
        self.layers: dict[str, AdaptedLayer] = {}
        self.originals: dict[str, torch.Tensor] | None = None  # base weights while fused (exact unfuse)
        self.scales = {name: 1.0 for name in self.components}  # call-time scale per component
        self.generations = 0  # how many times a whole ΔW was generated (tests count it)
        self._deltas: dict[str, list[torch.Tensor]] = {}
        self._cache_key: tuple | None = None
        self._token_hook = None  # pivotal tuning: adds the adapters' token offsets to the input embeddings
        self.token_rows: dict[int, torch.Tensor] = {}  # embedding rows before a fuse (exact unfuse)
        self._hooks = [
            module.register_forward_pre_hook(self._pre_forward(name), with_kwargs=True)
            for name, module in self.components.items()
        ]

    # ---- adapters -----------------------------------------------------------------------------------
    def add_adapter(self, name: str, module: SuperLoRA, targets: list[Target], metadata: dict[str, str] | None = None,
                    weight: float = 1.0) -> None:
        """Inject `module` (already built for `targets`' shapes) under `name` and activate it."""
        if name in self.adapters:
            raise ValueError(f"adapter name {name!r} is already loaded; pass another adapter_name or unload it first.")
        if self.originals is not None:
            raise ValueError("a SuperLoRA is fused; call unfuse_superlora() before loading another adapter.")
        parents = {t.name: self._parent_attention(t) for t in targets}
        for index, target in enumerate(targets):
            layer = self.layers.get(target.name)
            if layer is None:
                layer = self.layers[target.name] = AdaptedLayer(self, target, parents[target.name])
            layer.slots[name] = index
        metadata = dict(metadata or {})
        kernels = {t.name: list(t.kernel_size) for t in targets if t.kernel_size is not None}
        if kernels:  # conv targets: exporters need the kernel shape back from the file
            metadata["target_kernels"] = json.dumps(kernels)
        self.adapters[name] = Adapter(module, [t.name for t in targets], metadata)
        self.weights[name] = weight
        if getattr(module, "tokens", None) is not None and self._token_hook is None:
            self._token_hook = self._embeddings().register_forward_hook(self._add_token_offsets)
        self._invalidate()

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if self.originals is not None:
            raise ValueError("a SuperLoRA is fused; call unfuse_superlora() before deleting an adapter.")
        del self.adapters[name]
        self.weights.pop(name, None)
        for layer_name in list(self.layers):
            layer = self.layers[layer_name]
            layer.slots.pop(name, None)
            if not layer.slots:
                layer.remove()
                del self.layers[layer_name]
        if self._token_hook is not None and not any(hasattr(a.module, "tokens") for a in self.adapters.values()):
            self._token_hook.remove()
            self._token_hook = None
        self._invalidate()

    def set_adapters(self, names: list[str], weights: list[float | dict[str, float]]) -> None:
        """Activate `names` (all others off). A weight is a float, or as in diffusers' `set_adapters` a dict per
        component ({"unet": 0.8, "text_encoder": 1.0}: ComfyUI's strength_model / strength_clip; missing ones 1.0)."""
        for n in names:
            self._require(n)
        if len(names) != len(weights):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights; pass one weight per adapter.")
        self.weights = dict(zip(names, (self._checked_weight(n, w) for n, w in zip(names, weights))))
        self._invalidate()

    def _checked_weight(self, name: str, weight: float | dict[str, float]) -> float | dict[str, float]:
        if not isinstance(weight, dict):
            return float(weight)
        unknown = sorted(set(weight) - set(self.components))
        if unknown:
            raise ValueError(f"adapter {name!r}: unknown component {unknown[0]!r} in its weight dict; "
                             f"use {', '.join(repr(c) for c in self.components)}.")
        return {c: float(w) for c, w in weight.items()}

    def weight_for(self, name: str, component: str) -> float:
        """Adapter `name`'s weight on one component (0 when inactive; 1.0 for a component its dict omits)."""
        weight = self.weights.get(name, 0.0)
        return weight.get(component, 1.0) if isinstance(weight, dict) else weight

    def remove(self) -> None:
        """Restore the components exactly: unfuse, unpatch every layer, drop the hooks."""
        if self.originals is not None:
            self.unfuse()
        for layer in self.layers.values():
            layer.remove()
        for hook in self._hooks + ([self._token_hook] if self._token_hook is not None else []):
            hook.remove()
        self._token_hook = None
        self.layers.clear()
        self.adapters.clear()
        self._deltas.clear()

    def _require(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no SuperLoRA adapter named {name!r}; loaded: {sorted(self.adapters) or 'none'}.")

    def _parent_attention(self, target: Target) -> nn.Module | None:
        path = target.name.split(".", 1)[1]
        parent_path = path.rsplit(".to_out", 1)[0] if ".to_out." in path else path.rsplit(".", 1)[0]
        module = self.components[target.component]
        try:
            return module.get_submodule(parent_path)
        except AttributeError:
            return None

    # ---- pivotal tuning: token offsets on the first text encoder's input embeddings -------------------
    def _embeddings(self) -> nn.Embedding:
        encoder = self.components.get("text_encoder")
        if encoder is None:
            raise ValueError("this SuperLoRA trains a token embedding, but the pipeline has no text_encoder.")
        return encoder.get_input_embeddings()

    def _add_token_offsets(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook: Σ_adapters weight · call scale · offset where the input ids are an adapter's token."""
        if not self.enabled or self.originals is not None:  # fused: the offsets are in the embedding table
            return out
        scale = self.scales.get("text_encoder", 1.0)
        for name in self.weights:
            tokens, weight = getattr(self.adapters[name].module, "tokens", None), self.weight_for(name, "text_encoder")
            if tokens is not None and weight * scale != 0.0:
                out = tokens(args[0], out, weight * scale)
        return out

    # ---- the once-per-forward ΔW --------------------------------------------------------------------
    def _pre_forward(self, component: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if component == "unet":
                attention_kwargs = kwargs.get("cross_attention_kwargs") or {}
                self.scales[component] = float(attention_kwargs.get("scale", 1.0))
                self._check_processors()
            if torch.is_grad_enabled():
                self._invalidate()  # training: a fresh autograd graph for every model forward
                for name in self.adapters:  # the factored layers read factors without a generation: place them now
                    self._on_device(name)
        return hook

    def _invalidate(self) -> None:
        self._deltas, self._cache_key = {}, None

    def _check_processors(self) -> None:
        if self.originals is not None or not self.enabled:
            return
        for layer in self.layers.values():
            processor = getattr(layer.parent, "processor", None)
            if processor is not None and "Fused" in type(processor).__name__ and layer.name.endswith(("to_q", "to_k", "to_v")):
                raise RuntimeError(
                    f"{layer.name} is bypassed by fused QKV projections ({type(processor).__name__}), so the SuperLoRA "
                    "would be silently dropped; call pipe.unfuse_qkv_projections(), or pipe.fuse_superlora() first."
                )

    def _state_key(self) -> tuple:
        return tuple(
            (name, p.data_ptr(), p._version)
            for name in sorted(self.weights) for p in self.adapters[name].module.parameters()
        )

    def deltas(self, name: str) -> list[torch.Tensor]:
        """ΔW of every target of adapter `name` (scaled by alpha/rank), generated at most once per forward."""
        if not torch.is_grad_enabled():
            key = self._state_key()  # inference: reuse until a factor changes (in place or by .to())
            if key != self._cache_key:
                self._deltas, self._cache_key = {}, key
        elif self._cache_key is not None:  # never train through a ΔW generated without autograd
            self._invalidate()
        if name not in self._deltas:
            self._deltas[name] = self._on_device(name)()
            self.generations += 1
        return self._deltas[name]

    def _on_device(self, name: str) -> SuperLoRA:
        """Adapter `name`'s module, moved to its layers' device first (follows pipe.to(...); dtype unchanged)."""
        adapter = self.adapters[name]
        device = self.layers[adapter.targets[0]].layer.weight.device
        if next(adapter.module.parameters()).device != device:
            adapter.module.to(device)
        return adapter.module

    def delta_for(self, layer: AdaptedLayer) -> torch.Tensor | None:
        """The ΔW this layer adds now: Σ_adapters weight · call scale · ΔW, or None when nothing applies."""
        return self.terms_for(layer, low_rank=False)[0]

    def terms_for(self, layer: AdaptedLayer, low_rank: bool = True
                  ) -> tuple[torch.Tensor | None, list[tuple[float, torch.Tensor, torch.Tensor]]]:
        """(summed dense ΔW or None, [(weight · call scale, B, A)]) for this layer now.

        With autograd on, a weight whose ΔW is a plain B·A (the LoRA preset) comes back as its factors, so the
        layer trains on x·Aᵀ·Bᵀ like peft instead of forming W + ΔW and a dense weight gradient. At inference
        the cached dense ΔW is cheaper (generated once per pipeline call), so every adapter goes the dense way.
        """
        if not self.enabled or self.originals is not None:
            return None, []
        low_rank = low_rank and layer.low_rank_ok and torch.is_grad_enabled()
        scale = self.scales.get(layer.component, 1.0)
        total, factored = None, []
        for name, index in layer.slots.items():
            weight = self.weight_for(name, layer.component) * scale
            if weight == 0.0:
                continue
            factors = self.adapters[name].module.low_rank(index) if low_rank else None
            if factors is not None:
                factored.append((weight, *factors))
                continue
            delta = self.deltas(name)[index]
            delta = delta if weight == 1.0 else delta * weight
            total = delta if total is None else total + delta
        return total, factored

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the untouched base model inside the block (peft's `with model.disable_adapter():`)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    @contextlib.contextmanager
    def text_scale(self, scale: float | None) -> Iterator[None]:
        """Scale the text encoders' ΔW for one `encode_prompt` call (diffusers passes `lora_scale` there)."""
        saved = {c: self.scales[c] for c in self.scales if c != "unet"}
        for c in saved:
            self.scales[c] = 1.0 if scale is None else float(scale)
        try:
            yield
        finally:
            self.scales.update(saved)

    # ---- fusing -------------------------------------------------------------------------------------
    @torch.no_grad()
    def fuse(self, scale: float = 1.0) -> None:
        """Add scale · ΔW into the base weights; keep the originals (CPU, own dtype) for an exact unfuse."""
        if self.originals is not None:
            raise ValueError("a SuperLoRA is already fused; call unfuse_superlora() first.")
        saved_scales = dict(self.scales)
        self.scales = {c: float(scale) for c in self.scales}
        try:
            updates = {name: self.delta_for(layer) for name, layer in self.layers.items()}
        finally:
            self.scales = saved_scales
        originals = {}
        for name, delta in updates.items():
            if delta is None:
                continue
            weight = self.layers[name].layer.weight
            originals[name] = weight.detach().to("cpu", copy=True)
            weight.add_(delta.view(weight.shape).to(weight.dtype))
        self._fuse_tokens(scale)
        self.originals = originals

    def _fuse_tokens(self, scale: float) -> None:
        """Add scale · weight · offset into the token rows of the embedding table, keeping those rows."""
        for name in self.weights:
            tokens, weight = getattr(self.adapters[name].module, "tokens", None), self.weight_for(name, "text_encoder")
            if tokens is None or weight * scale == 0.0:
                continue
            table = self._embeddings().weight
            for row, token_id in zip(tokens.delta, tokens.ids.tolist()):
                self.token_rows.setdefault(token_id, table[token_id].detach().to("cpu", copy=True))
                table[token_id] += (weight * scale * row).to(table)

    @torch.no_grad()
    def unfuse(self) -> None:
        if self.originals is None:
            raise ValueError("no SuperLoRA is fused; nothing to unfuse.")
        for name, original in self.originals.items():
            weight = self.layers[name].layer.weight
            weight.copy_(original.to(weight.device))
        for token_id, row in self.token_rows.items():
            table = self._embeddings().weight
            table[token_id] = row.to(table.device)
        self.token_rows = {}
        self.originals = None
        self._invalidate()


def get_superlora_model(components: dict[str, nn.Module], create: bool = False) -> SuperLoRAModel | None:
    """The `SuperLoRAModel` attached to these components' UNet (created on demand)."""
    unet = components.get("unet")
    if unet is None:
        raise ValueError("SuperLoRA needs a pipeline with a UNet (components 'unet' and text encoders).")
    model = getattr(unet, "_superlora", None)
    if model is None and create:
        model = SuperLoRAModel(components)
        unet._superlora = model
    return model


def target_shapes(components: dict[str, nn.Module], target_modules: str | list[str]) -> list[Shape]:
    return [t.shape for t in find_targets(components, target_modules)]


def inject_superlora(components: dict[str, nn.Module], config: SuperLoRAConfig, adapter_name: str = "default",
                     metadata: dict[str, str] | None = None) -> SuperLoRA:
    """Build a fresh (ΔW = 0) SuperLoRA for `config.target_modules` and inject it; returns the trainable module."""
    targets = find_targets(components, config.target_modules)
    module = SuperLoRA(config, [t.shape for t in targets])
    device = targets[0].module.weight.device
    module.to(device)
    get_superlora_model(components, create=True).add_adapter(adapter_name, module, targets, metadata)
    return module


def remove_superlora(components: dict[str, nn.Module]) -> None:
    model = get_superlora_model(components)
    if model is not None:
        model.remove()
        del components["unet"]._superlora
