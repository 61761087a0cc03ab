"""Which weights a SuperLoRA adapts: presets and module-name patterns, in one deterministic order.

A target is an `nn.Linear` (or an `nn.Conv2d`, adapted as the matrix (d_out, d_in·k_h·k_w), as LyCORIS's
LoCon and kohya's conv LoRA do) named by its component and path, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`. The order (components in `COMPONENTS`
order, then `named_modules()` order) fixes where each weight sits in the super-vector, so it is
recorded in the adapter file and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from torch import nn

from .layout import Shape

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
UNET_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_PROJECTION = re.compile(r".*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)")
RESNET_CONVS = re.compile(r".*resnets\.\d+\.(conv1|conv2)")
PRESETS = {
    "unet": "every UNet attention projection (self- and cross-attention)",
    "unet+conv": "every UNet attention projection and the ResNet blocks' conv1/conv2 (LoCon-style)",
    "unet-cross": "the UNet's cross-attention projections only",
    "text": "the text encoders' attention projections only",
    "unet+text": "every UNet attention projection and the text encoders' attention",
    "unet+conv+text": "'unet+conv' and the text encoders' attention",
}
TEXT_ENCODER_PATTERN = r"text_encoder(_2)?\..*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
WITH_TEXT = {"unet": "unet+text", "unet+conv": "unet+conv+text", "text": "text", "unet+text": "unet+text",
             "unet+conv+text": "unet+conv+text"}


@dataclass(frozen=True)
class Target:
    name: str  # "<component>.<module path>"
    module: nn.Linear | nn.Conv2d

    @property
    def component(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def shape(self) -> Shape:
        """(d_out, d_in) of the matrix ΔW; a conv kernel (d_out, d_in/groups, k_h, k_w) counts as (d_out, rest)."""
        return layer_shape(self.module)

    @property
    def kernel_size(self) -> tuple[int, int] | None:
        return tuple(self.module.kernel_size) if isinstance(self.module, nn.Conv2d) else None

    @property
    def kernel_numel(self) -> int:
        """k_h·k_w of a conv, 1 for a Linear: the size of the kernel axis (`SuperLoRAConfig.kernel_axis`)."""
        return self.kernel_size[0] * self.kernel_size[1] if self.kernel_size else 1


def layer_shape(layer: nn.Module) -> Shape:
    weight = layer.weight
    return (weight.shape[0], weight[0].numel())


def unwrap(module: nn.Module) -> nn.Module:
    """The plain layer under peft's wrappers (a LoRA loaded with `load_lora_weights` wraps `to_q` etc.)."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__ == "Attention" and hasattr(module, "to_q")


def _unet_candidates(unet: nn.Module, cross_only: bool) -> list[tuple[str, nn.Module]]:
    found = []
    for path, module in unet.named_modules():
        if not _is_attention(module) or (cross_only and not module.is_cross_attention):
            continue
        for proj in UNET_PROJECTIONS:
            sub = module.get_submodule(proj) if _has_submodule(module, proj) else None
            if sub is not None:
                found.append((f"{path}.{proj}", unwrap(sub)))
    return found


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        return module.get_submodule(path) is not None
    except AttributeError:
        return False


def _plain_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear / nn.Conv2d by its user-facing path (peft's own sub-layers skipped, wrapped layers unwrapped)."""
    found = []
    for path, sub in module.named_modules():
        if ".base_layer" in path or ".lora_" in path:
            continue
        layer = unwrap(sub)
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            found.append((path, layer))
    return found


def find_targets(components: dict[str, nn.Module], target_modules: str | list[str]) -> list[Target]:
    """The adapted layers for a preset name or a list of patterns, in super-vector order.

    A pattern matches a qualified name as a regex (`re.fullmatch`) or as a suffix after a dot, as peft's
    `target_modules` does ("to_q" matches every `...to_q`).
    """
    ordered = [(c, components[c]) for c in COMPONENTS if components.get(c) is not None]
    candidates: list[tuple[str, nn.Module]] = []
    if isinstance(target_modules, str):
        if target_modules not in PRESETS:
            raise ValueError(
                f"target_modules={target_modules!r} is not a preset ({', '.join(PRESETS)}); pass a preset or a "
                "list of module-name patterns."
            )
        for component, module in ordered:
            if component == "unet" and target_modules != "text":
                candidates += [(f"unet.{p}", m) for p, m in _unet_candidates(module, target_modules == "unet-cross")]
            if component == "unet" and target_modules in ("unet+conv", "unet+conv+text"):
                candidates += [(f"unet.{p}", m) for p, m in _plain_layers(module) if RESNET_CONVS.fullmatch(p)]
            if component in TEXT_ENCODERS and target_modules in ("text", "unet+text", "unet+conv+text"):
                candidates += [(f"{component}.{p}", m) for p, m in _plain_layers(module) if TEXT_PROJECTION.fullmatch(p)]
    else:
        patterns = [re.compile(p) for p in target_modules]
        for component, module in ordered:
            for path, layer in _plain_layers(module):
                name = f"{component}.{path}"
                if any(p.fullmatch(name) or name.endswith("." + p.pattern) for p in patterns):
                    candidates.append((name, layer))
    if not candidates:
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear or conv layer of {[c for c, _ in ordered]}; check the "
            "names with `[n for n, _ in pipe.unet.named_modules()]`."
        )
    return [Target(name, layer) for name, layer in candidates]


def with_text_encoder(target_modules: str | list[str]) -> str | list[str]:
    """The same targets plus the text encoders' attention: what diffusers' `--train_text_encoder` means."""
    if isinstance(target_modules, str):
        if target_modules not in WITH_TEXT:
            raise ValueError(f"target_modules={target_modules!r} has no text-encoder variant; pass module patterns that "
                             "include the text encoder, or drop --train_text_encoder.")
        return WITH_TEXT[target_modules]
    if any(p.startswith("text_encoder") for p in target_modules):
        return target_modules
    return [*target_modules, TEXT_ENCODER_PATTERN]


def fingerprint(names_and_shapes: list[tuple[str, Shape]]) -> str:
    """A short hash of the ordered target names and shapes: two bases with equal fingerprints fit the same files."""
    payload = json.dumps([[n, int(o), int(i)] for n, (o, i) in names_and_shapes], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
