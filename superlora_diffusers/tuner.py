"""SuperLoRA as a peft tuner: `unet.add_adapter(SuperLoRAConfig(...))` and `peft.get_peft_model(model, config)`.

Three pieces, shaped like peft's VB-LoRA (one trainable bank shared by every layer):

- `SharedGenerator`: the `SuperLoRA` module of one adapter, registered ONCE in the adapted model's tree as
  `model.superlora_generator[<adapter>]`, so `.to()`, `state_dict`, `parameters()`, DDP and optimisers see each
  factor once. It generates the ΔW list at most once per forward of that model (two forward hooks on the model
  mark where a forward starts and ends).
- `SuperLoRALayer` (`Linear`, `Conv2d`): peft tuner layers around the base layer. Per adapter they hold their slot in
  the generator's ΔW list and their `scaling` (the weight diffusers' `set_adapters` / call-time scale sets), and an
  *unregistered* reference to the generator. So diffusers' verbs (`set_adapters`, `fuse_lora`, `disable_lora`,
  `delete_adapters`, `scale_lora_layers`) drive them as they drive peft's LoRA.
- `SuperLoRATuner(BaseTuner)`: finds all targets first (the layout needs every shape in a fixed order), builds the
  generator, then lets peft wrap each target.

Caching: in training every forward regenerates ΔW with autograd (once, however many layers read it); in eager
inference the list is kept until a factor changes; under `torch.compile` nothing is kept across forwards, so the
generation is traced into the graph and no data-dependent Python remains.
"""

from __future__ import annotations

import contextlib
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from torch import nn

from .config import PEFT_TYPE, SuperLoRAConfig
from .superlora import SuperLoRA
from .targets import PRESETS, find_targets, layer_shape, unwrap

PREFIX = "superlora_"
GENERATORS = "superlora_generator"  # the adapted model's ModuleDict of generators, keyed by adapter name


# ---- the shared generator ---------------------------------------------------------------------------------
@dataclass
class _Cache:
    """Plain-Python bookkeeping of a generator (kept off the module so it is never a submodule or a buffer)."""

    deltas: list[torch.Tensor] | None = None
    factors: list | None = None  # the axes layout's tensors (a projected one computes them from v)
    key: tuple | None = None  # the factors' state the cached deltas were generated from (eager inference)
    inside: bool = False  # a forward of the owning model is running
    readers: int = 0  # tuner layers holding this generator
    hooks: list = field(default_factory=list)
    owner: Callable[[], nn.Module | None] | None = None  # weakref to the model whose tree holds the generator
    name: str = ""


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class SharedGenerator(SuperLoRA):
    """One adapter's `SuperLoRA`, owned by one model, read by its layers; ΔW generated at most once per forward.

    State-dict names are `SuperLoRA`'s own (`blocks.0.lora_A`, ...), under `superlora_generator.<adapter>.`.
    """

    def __init__(self, config: SuperLoRAConfig, shapes: list[tuple[int, int]],
                 kernels: list[int] | None = None) -> None:
        super().__init__(config, shapes, kernels)
        self.targets: list[str] = []  # the adapted weights' names in slot order ("unet.<path>"; the file's targets)
        self.metadata: dict[str, str] = {}  # the rest of the adapter file's header (instance prompt, kernels, ...)
        self.generations = 0  # how many times the whole ΔW list was generated in eager mode (tests count it)
        self.changes = 0  # bumped whenever the factors may have been replaced (.to(), load_state_dict)
        self.cache = _Cache()
        self.register_load_state_dict_post_hook(SharedGenerator._loaded)

    # -- ownership --
    def attach(self, owner: nn.Module, adapter_name: str) -> None:
        """Register under `owner.superlora_generator[adapter_name]` and follow `owner`'s forwards."""
        if not isinstance(getattr(owner, GENERATORS, None), nn.ModuleDict):
            setattr(owner, GENERATORS, nn.ModuleDict())
        getattr(owner, GENERATORS)[adapter_name] = self
        self.cache.owner, self.cache.name = weakref.ref(owner), adapter_name
        self.follow(owner)

    def follow(self, model: nn.Module) -> None:
        """Generate at most once per forward of `model` too (a text encoder whose layers read this generator)."""
        self.cache.hooks += [model.register_forward_pre_hook(self._begin),
                             model.register_forward_hook(self._end, always_call=True)]

    def release(self) -> None:
        """A layer dropped this adapter; the last one to do so removes the generator from its owner."""
        self.cache.readers -= 1
        if self.cache.readers <= 0:
            self.detach()

    def detach(self) -> None:
        """Leave the owner's tree and stop following its forwards.

        The (possibly empty) `superlora_generator` dict stays: diffusers deletes adapters while iterating
        `model.modules()`, and removing an attribute of the model then would change the dict being iterated.
        """
        for hook in self.cache.hooks:
            hook.remove()
        self.cache.hooks = []
        owner = self.cache.owner() if self.cache.owner is not None else None
        holder = getattr(owner, GENERATORS, None)
        if holder is not None and self.cache.name in holder and holder[self.cache.name] is self:
            del holder[self.cache.name]

    # -- the once-per-forward ΔW --
    def deltas(self) -> list[torch.Tensor]:
        """Every ΔW (alpha/rank applied), generated at most once per forward of the owner."""
        return self._once_per_forward("deltas", self._generate)

    def axis_factors(self) -> list:
        """The axes layout's tensors (a projected one's θ0 + F·v), computed at most once per forward, as ΔW is."""
        return self._once_per_forward("factors", super().axis_factors)

    def _generate(self) -> list[torch.Tensor]:
        if not _compiling():  # a Python counter bumped inside a graph would recompile it every call
            self.generations += 1
        return self()

    def _once_per_forward(self, name: str, make: Callable[[], list]) -> list:
        """`cache.<name>`, made by `make()` unless this forward (or unchanged eager inference) already made it."""
        cache = self.cache
        if not cache.inside:  # a layer called on its own: no owner forward validated the cache
            self._refresh()
        value = getattr(cache, name)
        if value is None:
            value = make()
            if cache.inside or not torch.is_grad_enabled():
                setattr(cache, name, value)
        return value

    def state_key(self) -> tuple:
        """What the cached ΔW depends on: `changes` and every factor's in-place version (optimiser steps, copies)."""
        return (self.changes, tuple(p._version for p in self.parameters()))

    def invalidate(self) -> None:
        self.cache.deltas, self.cache.factors, self.cache.key = None, None, None

    def _refresh(self) -> None:
        """Drop the cache unless this is eager inference and no factor changed since it was filled."""
        if _compiling() or torch.is_grad_enabled():
            self.invalidate()
            return
        key = self.state_key()
        if key != self.cache.key:
            self.cache.deltas, self.cache.factors, self.cache.key = None, None, key

    def _begin(self, module: nn.Module, args: tuple) -> None:
        if not _compiling() and self._orphaned():
            self.detach()
            return
        self.cache.inside = True
        self._refresh()

    def _orphaned(self) -> bool:
        """Whether the owner dropped this adapter without deleting it through peft's layers (diffusers'
        `unload_lora_weights` only swaps the layers out and deletes `peft_config`): then the next forward of a
        model it follows removes the generator from the owner's tree."""
        owner = self.cache.owner() if self.cache.owner is not None else None
        return owner is None or self.cache.name not in getattr(owner, "peft_config", {})

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.cache.inside = False
        if _compiling() or torch.is_grad_enabled():  # free the autograd graph; a compiled graph keeps nothing
            self.cache.deltas = self.cache.factors = None

    def _apply(self, fn: Callable, recurse: bool = True) -> "SharedGenerator":
        self.changes += 1  # .to() / .half() replace the factors' storage
        self.invalidate()
        return super()._apply(fn, recurse)

    @staticmethod
    def _loaded(module: "SharedGenerator", incompatible_keys: Any) -> None:
        module.changes += 1  # load_state_dict(assign=True) replaces the factors
        module.invalidate()


# ---- the layers -------------------------------------------------------------------------------------------
class SuperLoRALayer(BaseTunerLayer):
    """A peft tuner layer whose ΔW is one slot of a shared generator's output.

    `superlora_shared` maps adapter -> generator in a plain dict: the layer reads the generator without owning it
    (it is registered once, in the model). peft's `set_adapter`/`enable_adapters` toggle its requires_grad.
    Subclasses give `_forward_with_delta` (the base output with ΔW added to the weight) and `_low_rank_forward`
    (x·Aᵀ·Bᵀ in their kind of operation).
    """

    adapter_layer_names = ("superlora_shared",)
    other_param_names = ("superlora_slot", "scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.superlora_shared: dict[str, SharedGenerator] = {}
        self.superlora_slot: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.unmerged_weight: torch.Tensor | None = None  # the base weight before merging (exact unmerge)

    def update_layer(self, adapter_name: str, generator: SharedGenerator, slot: int, inference_mode: bool = False) -> None:
        self.superlora_shared[adapter_name] = generator
        self.superlora_slot[adapter_name] = slot
        self.scaling[adapter_name] = 1.0  # alpha / rank is inside the generator's factors
        generator.cache.readers += 1
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        generator = self.superlora_shared.get(adapter_name)
        super().delete_adapter(adapter_name)
        if generator is not None:
            generator.release()

    # -- scale, as peft's LoRA (diffusers' set_adapters and call-time scale use these) --
    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = float(scale)

    def scale_layer(self, scale: float) -> None:
        if scale == 1:
            return
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                self.scaling[adapter] = 1.0 if scale is None else self.scaling[adapter] / scale

    # -- merge --
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling · ΔW of `adapter`, shaped and typed like the base weight."""
        weight = self.get_base_layer().weight
        with torch.no_grad():  # merging only; inference caching makes every layer share one generation
            delta = self.superlora_shared[adapter].deltas()[self.superlora_slot[adapter]]
        return (self.scaling[adapter] * delta).view(weight.shape).to(weight)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add each adapter's scaling · ΔW into the base weight, keeping a CPU copy of it for an exact unmerge."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.superlora_slot:
                continue
            weight = self.get_base_layer().weight
            merged = weight.data + self.get_delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapter {adapter} seems to be broken.")
            if not self.merged_adapters:
                self.unmerged_weight = weight.detach().to("cpu", copy=True)
            weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Put back the weight as it was before the first merge, bit for bit (peft's LoRA subtracts instead)."""
        if self.merged_adapters and self.unmerged_weight is not None:
            weight = self.get_base_layer().weight
            weight.data = self.unmerged_weight.to(weight.device)
        self.merged_adapters, self.unmerged_weight = [], None

    # -- forward --
    def _base_only(self) -> bool:
        """Whether this call is the base layer's alone: adapters off (a merged ΔW is taken out of the weight first,
        so off means the base weights) or merged into the weight already."""
        if not self.disable_adapters:
            return self.merged
        if self.merged:
            self.unmerge()
        return True

    def _adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._base_only():
            return self.base_layer(x, *args, **kwargs)
        delta, factored = self._terms()
        out = self._forward_with_delta(x, delta, *args, **kwargs)
        for scale, b, a in factored:
            out = out + scale * self._low_rank_forward(x, b.to(x), a.to(x))
        return out

    def _terms(self) -> tuple[torch.Tensor | None, list[tuple[float, torch.Tensor, torch.Tensor]]]:
        """(Σ scaling · ΔW of the dense adapters, [(scaling, B, A)] of the factored ones) for this call.

        Training a weight whose ΔW is a plain B·A (the `lora` preset, `groups="shape"`) takes the factored path
        x·Aᵀ·Bᵀ, as peft's LoRA does: no d_out × d_in ΔW and no dense weight gradient.
        """
        total, factored = None, []
        factored_ok = torch.is_grad_enabled() and self._factored_ok()
        for adapter in self.active_adapters:
            generator = self.superlora_shared.get(adapter)
            if generator is None or self.scaling[adapter] == 0:
                continue
            scale, slot = self.scaling[adapter], self.superlora_slot[adapter]
            factors = generator.low_rank(slot) if factored_ok else None
            if factors is not None:
                factored.append((scale, *factors))
                continue
            delta = generator.deltas()[slot]
            delta = delta if scale == 1 else scale * delta
            total = delta if total is None else total + delta
        return total, factored

    def _factored_ok(self) -> bool:
        """Whether x·Aᵀ·Bᵀ can stand in for this layer's ΔW (Conv2d narrows it)."""
        return True


class _Wrapper(nn.Module, SuperLoRALayer):
    """The module part shared by `Linear` and `Conv2d` (nn.Module first, as peft's layers, so `forward` is ours)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, generator: SharedGenerator, slot: int,
                 inference_mode: bool = False) -> None:
        super().__init__()
        SuperLoRALayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, generator, slot, inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._adapted_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "superlora." + super().__repr__()


class Linear(_Wrapper):
    """SuperLoRA around an `nn.Linear`: x·(W + ΔW)ᵀ + b in one matmul."""

    def _forward_with_delta(self, x: torch.Tensor, delta: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        if delta is None:
            return base(x, *args, **kwargs)
        if isinstance(base, BaseTunerLayer):  # another adapter (e.g. a peft LoRA) wraps the weight: keep its output
            return base(x, *args, **kwargs) + F.linear(x, delta.to(x))
        return F.linear(x, base.weight + delta.to(base.weight), base.bias)

    def _low_rank_forward(self, x: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, a), b)


class Conv2d(_Wrapper):
    """SuperLoRA around an `nn.Conv2d`: ΔW's (d_out, d_in·k_h·k_w) matrix viewed as the kernel."""

    def _factored_ok(self) -> bool:
        conv = self.get_base_layer()  # x·Aᵀ·Bᵀ as two convs needs a plain zero-padded conv
        return conv.groups == 1 and conv.padding_mode == "zeros"

    def _forward_with_delta(self, x: torch.Tensor, delta: torch.Tensor | None, *args: Any, **kwargs: Any) -> torch.Tensor:
        base, conv = self.base_layer, self.get_base_layer()
        if delta is None:
            return base(x, *args, **kwargs)
        delta = delta.view(conv.weight.shape).to(conv.weight)
        if isinstance(base, BaseTunerLayer):
            return base(x, *args, **kwargs) + conv._conv_forward(x, delta, None)
        return conv._conv_forward(x, conv.weight + delta, conv.bias)

    def _low_rank_forward(self, x: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """A as an r-channel kernel, then B as a 1x1 conv."""
        conv = self.get_base_layer()
        h = F.conv2d(x, a.reshape(a.shape[0], *conv.weight.shape[1:]), None, conv.stride, conv.padding, conv.dilation)
        return F.conv2d(h, b[..., None, None])


class Embedding(_Wrapper):
    """Pivotal tuning: an adapter's token offsets added to a text encoder's input embeddings where the input ids
    are its word's (`tokens.TokenOffsets`). As a tuner layer, the offsets follow the adapter's weight, the call-time
    scale, disabling, fusing and deleting exactly as the ΔW of the projections do."""

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base_only = self._base_only()
        out = self.base_layer(input_ids, *args, **kwargs)
        if base_only:
            return out
        for adapter in self.active_adapters:
            generator = self.superlora_shared.get(adapter)
            if generator is not None and self.scaling[adapter] != 0:
                out = generator.tokens(input_ids, out, self.scaling[adapter])
        return out

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling · offsets on the word's rows of the embedding table, zero elsewhere."""
        table, tokens = self.get_base_layer().weight, self.superlora_shared[adapter].tokens
        rows = (self.scaling[adapter] * tokens.delta.detach()).to(table)
        return torch.zeros_like(table).index_add_(0, tokens.ids.to(table.device), rows)


# ---- targets ----------------------------------------------------------------------------------------------
def model_targets(model: nn.Module, config: SuperLoRAConfig) -> list[tuple[str, nn.Module]]:
    """(module path, plain layer) of every layer `config` adapts in `model`, in super-vector order.

    A preset resolves as on a pipeline (`targets.find_targets`, attention projections first); peft's forms (a
    list of names / suffixes, a regex string) match in `named_modules()` order. Layers already wrapped by a peft
    tuner are matched by their user-facing path; the tuners' own sub-layers (`lora_A`, ...) never are.
    """
    target_modules = config.target_modules
    if isinstance(target_modules, str) and target_modules in PRESETS:
        if "text" in target_modules and target_modules != "text":
            raise ValueError(f"target_modules={target_modules!r} spans the UNet and the text encoders; on one model "
                             "use 'unet', 'unet+conv', 'unet-cross' or 'text', or load through the pipeline.")
        component = "text_encoder" if target_modules == "text" else "unet"
        return [(t.name.split(".", 1)[1], t.module) for t in find_targets({component: model}, target_modules)]
    wrapped = [key + "." for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    found = []
    for key, module in model.named_modules():
        if not key or key.startswith(GENERATORS + ".") or any(key.startswith(p) for p in wrapped):
            continue
        if not check_target_module_exists(config, key):
            continue
        layer = unwrap(module)
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{key} is a {type(layer).__name__}; SuperLoRA adapts nn.Linear and nn.Conv2d layers.")
        found.append((key, layer))
    if not found:
        raise ValueError(f"target_modules={target_modules!r} matches no layer of {type(model).__name__}.")
    return found


# ---- the tuner --------------------------------------------------------------------------------------------
_SHARED: ContextVar[tuple[SharedGenerator, dict[str, int]] | None] = ContextVar("superlora_shared", default=None)
TOKEN_SLOT = -1  # the slot of the input embeddings (pivotal tuning) among a model's targets


@contextlib.contextmanager
def sharing(generator: SharedGenerator, slots: dict[str, int]) -> Iterator[None]:
    """Inside the block, injecting `generator`'s adapter into a model wraps exactly the modules named in `slots`
    (module path -> slot in the generator; `TOKEN_SLOT` for the input embeddings) and reads `generator`, which
    another model owns, instead of building one over that model alone: one super-vector over several models."""
    token = _SHARED.set((generator, slots))
    try:
        yield
    finally:
        _SHARED.reset(token)


def _is_generator_key(key: str, adapter_name: str) -> bool:
    """Whether a state-dict key belongs to `adapter_name`'s generator (at any depth: PeftModel adds a prefix)."""
    marker = f"{GENERATORS}.{adapter_name}."
    return key.startswith(marker) or f".{marker}" in key


class SuperLoRATuner(BaseTuner):
    """peft's model class for SuperLoRA (`peft.get_peft_model`, `inject_adapter_in_model`, diffusers' `add_adapter`).

    `uses_shared_state` stays False although the generator is shared: peft uses that flag for state kept on the
    tuner object, which `inject_adapter_in_model` (diffusers' `add_adapter`) throws away. Here the shared state lives
    in the adapted model itself, so direct injection keeps it.
    """

    prefix = PREFIX
    tuner_layer_cls = SuperLoRALayer
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: SuperLoRAConfig, adapter_name: str) -> None:
        """Find every target first (the layout depends on all shapes), build the generator, register it once."""
        shared = _SHARED.get()
        if shared is not None:  # a pipeline-wide adapter: its generator exists and is owned by another model
            self._superlora_shared = shared
            return
        if config.token is not None:
            raise ValueError("pivotal tuning (token=...) needs the pipeline's text encoder and tokenizer; load it with "
                             "pipe.load_superlora_weights, not add_adapter / get_peft_model.")
        targets = model_targets(model, config)
        generator = SharedGenerator(config, [layer_shape(layer) for _, layer in targets])
        generator.to(targets[0][1].weight.device)
        generator.attach(model, adapter_name)
        generator.targets = [key for key, _ in targets]
        # a tuple, not an attribute: the tuner is an nn.Module (PeftModel keeps it), which must not own the generator
        self._superlora_shared = (generator, {key: slot for slot, (key, _) in enumerate(targets)})

    def _check_target_module_exists(self, config: SuperLoRAConfig, key: str) -> bool:
        return key in self._superlora_shared[1]

    def _create_and_replace(self, config: SuperLoRAConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        generator, slots = self._superlora_shared
        slot = slots[current_key]
        if isinstance(target, SuperLoRALayer):  # a second SuperLoRA on the same layer
            target.update_layer(adapter_name, generator, slot, config.inference_mode)
            return
        base = unwrap(target)
        layer_cls = Embedding if slot == TOKEN_SLOT else Conv2d if isinstance(base, nn.Conv2d) else Linear
        self._replace_module(parent, target_name, layer_cls(target, adapter_name, generator, slot), target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """peft freezes everything outside its tuner layers; the generators live beside them, in the model."""
        super()._mark_only_adapters_as_trainable(model)
        for name, generator in getattr(model, GENERATORS, {}).items():
            if name in self.peft_config:
                generator.requires_grad_(name in self.active_adapters and not self.peft_config[name].inference_mode)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if hasattr(model, GENERATORS):
            for generator in list(getattr(model, GENERATORS).values()):
                generator.detach()
            delattr(model, GENERATORS)
        return model

    # -- peft's save / load hooks: the generator's keys, once, without the adapter name --
    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: SuperLoRAConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor], unwanted_adapter_names: list[str]
                                ) -> dict[str, torch.Tensor]:
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        out.update({k: v for k, v in state_dict.items() if _is_generator_key(k, adapter_name)})
        return out

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        if _is_generator_key(key, adapter_name):
            return key.replace(f"{GENERATORS}.{adapter_name}.", f"{GENERATORS}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: SuperLoRAConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        to_model = {}
        for path, module in model.named_modules():
            if isinstance(module, SharedGenerator) and _is_generator_key(path + ".", adapter_name):
                for name in module.state_dict():
                    model_key = f"{path}.{name}"
                    # saved by a PeftModel ("base_model.model." ...) or by an injected model (diffusers): accept both
                    bare = cls._remove_adapter_name_from_key(model_key, adapter_name).removeprefix("base_model.model.")
                    to_model[bare] = to_model["base_model.model." + bare] = model_key
        state_dict = {to_model.get(k, k): v for k, v in state_dict.items()}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def register() -> None:
    """Make "SUPERLORA" a peft method, as `peft.utils.register_peft_method` does.

    That function only accepts names that are members of peft's closed `PeftType` enum, so the same three
    mappings are filled here, with its uniqueness checks; peft looks them up by the config's `peft_type` string.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE) is SuperLoRATuner:
        return
    if PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING or PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        raise KeyError(f"peft already has a method called {PEFT_TYPE!r}.")
    if PREFIX in PEFT_TYPE_TO_PREFIX_MAPPING.values():
        raise KeyError(f"peft already has a method with the prefix {PREFIX!r}.")
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = SuperLoRAConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = SuperLoRATuner
