"""`SuperLoRAConfig`: every hyper-parameter of the SuperLoRA family in one serialisable dataclass.

One configuration space spans LoRA, LoKr, group-wise LoRA, LoNKr and LoRTA (Tucker); the named
constructors below build those special cases. The config is stored as JSON in the adapter file's
header, so `to_dict` / `from_dict` must round-trip exactly.

It is also a `peft.PeftConfig` (peft type "SUPERLORA", registered by `tuner.py`), so `unet.add_adapter(config)`
and `peft.get_peft_model(model, config)` accept it. peft's own fields (`peft_type`, `task_type`, ...) never reach
the adapter file's header: `to_dict` is today's dict, and only peft's `adapter_config.json` carries them.
"""

from __future__ import annotations

import math
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Union, get_args

from peft import PeftConfig
from peft.utils import CONFIG_NAME

Factorization = Literal["lora", "kronecker", "tucker"]
Projection = Literal["none", "fastfood", "gaussian", "isometric"]
Groups = Union[int, Literal["weight", "shape"]]

FACTORIZATIONS: tuple[str, ...] = get_args(Factorization)
PROJECTIONS: tuple[str, ...] = get_args(Projection)
CONFIG_VERSION = 1
PEFT_TYPE = "SUPERLORA"  # peft's name for the method (see tuner.register); not a PeftType member


@dataclass(kw_only=True)
class SuperLoRAConfig(PeftConfig):
    """Hyper-parameters of a SuperLoRA adapter (see docs and `../shared/superlora-method.md`).

    Args:
        factorization: how each folded chunk is factored: "lora" (A·Bᵀ, fold 2), "kronecker"
            (⊗ of `kron_splits` factors, fold 2) or "tucker" (core ×ₘ factor matrices, any fold).
        rank: rank r of the low-rank factors (Tucker: core size r per mode).
        alpha: scale numerator; ΔW is multiplied by alpha / rank. None means alpha = rank (scale 1).
        groups: number G of equal chunks of the super-vector, "weight" for one chunk per adapted
            weight (weight-aligned; with fold=2 each chunk keeps its native (d_out, d_in) shape), or
            "shape": the weights of each (d_out, d_in) shape stacked along a layer axis and Tucker-factored
            along (layer, d_out, d_in) without reshaping (`axes.py`; needs factorization="tucker", fold=3).
        kernel_axis: with groups="shape", a conv's kernel (k_h·k_w) is a Tucker axis of its own instead of
            part of d_in = c_in·k_h·k_w (a conv weight's real axes; far fewer parameters per rank).
        share_axes: with groups="shape", one basis per axis role and length shared by every shape (all
            d_out = 128 read one U_out): a shape keeps only its core and layer factor (the smallest layouts).
        fold: order M of the tensor each chunk is folded into (2 = matrix, 3 = cube, ...).
        fold_shape: explicit mode sizes (product >= chunk size) instead of equal sizes; needs integer groups.
        shuffle: apply one fixed random permutation to the super-vector before grouping.
        shuffle_seed: seed of that permutation (the permutation is regenerated, never stored).
        projection: fixed random map lifting the factors' ρ·N_g entries to N_g ("none" needs ratio 1); with
            groups="shape", it lifts one trainable vector of ρ·N entries to the layout's N factor entries.
            "fastfood" mixes every coordinate into every entry; "isometric" (Uni-LoRA's map) reads each entry
            from one coordinate; "gaussian" is a dense map for small adapters.
        projection_ratio: ρ in (0, 1].
        projection_seed: seed of the projection (regenerated, never stored).
        kron_splits: number K of Kronecker factors (2 = LoKr, >= 3 = LoNKr).
        kron_factor: LyCORIS-style size of the small factors (-1: balanced, as small as possible).
        kron_decompose_both: also factor the first (small) Kronecker factor at rank r.
        target_modules: which layers to adapt: a preset name ("unet", "unet+conv", ...; see `targets.PRESETS`),
            a list of module names or patterns, or (peft's form) one regex string matched against full module names.
        token: pivotal tuning (diffusers' `--train_text_encoder_ti`): the identifier word (e.g. "sks") whose
            input embedding trains beside the factors, as an offset on each of its `token_ids` (the first text
            encoder's tokenizer ids, checked on load) of width `token_dim`. None: no embedding trains.
    """

    factorization: Factorization = "lora"
    rank: int = 4
    alpha: float | None = None
    groups: Groups = "weight"
    kernel_axis: bool = False
    share_axes: bool = False
    fold: int = 2
    fold_shape: tuple[int, ...] | None = None
    shuffle: bool = False
    shuffle_seed: int = 0
    projection: Projection = "none"
    projection_ratio: float = 1.0
    projection_seed: int = 0
    kron_splits: int = 2
    kron_factor: int = -1
    kron_decompose_both: bool = False
    target_modules: str | list[str] = "unet"
    token: str | None = None
    token_ids: tuple[int, ...] = ()
    token_dim: int = 0
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        super().__post_init__()  # peft fills peft_version
        self.peft_type = PEFT_TYPE
        if self.fold_shape is not None:
            self.fold_shape = tuple(int(n) for n in self.fold_shape)
        self.token_ids = tuple(int(i) for i in self.token_ids)
        if isinstance(self.target_modules, (tuple, set)):  # peft may hand back a set of names
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
        self.validate()

    @property
    def scale(self) -> float:
        """alpha / rank: the factor ΔW is multiplied by (LoRA's convention)."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def validate(self) -> None:
        """Reject impossible combinations with one line that names the fix."""
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"SuperLoRA config version {self.version} is not supported by this library (expects "
                f"{CONFIG_VERSION}); upgrade superlora-diffusers."
            )
        if self.factorization not in FACTORIZATIONS:
            raise ValueError(f"factorization={self.factorization!r} is unknown; use one of {FACTORIZATIONS}.")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection={self.projection!r} is unknown; use one of {PROJECTIONS}.")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive integer.")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ValueError(f"alpha={self.alpha!r} must be a finite number (or None for alpha = rank).")
        if self.groups not in ("weight", "shape") and (not isinstance(self.groups, int) or self.groups < 1):
            raise ValueError(f"groups={self.groups!r} must be a positive integer, 'weight' or 'shape'.")
        if self.groups == "shape":
            self._validate_shape_groups()
        elif self.kernel_axis or self.share_axes:
            name, what = (("kernel_axis", "splits a conv's kernel off in") if self.kernel_axis else
                          ("share_axes", "shares the bases of"))
            raise ValueError(f"{name} {what} the axes layout; set groups='shape' (got groups={self.groups!r}) "
                             f"or drop {name}.")
        if not isinstance(self.fold, int) or self.fold < 2:
            raise ValueError(f"fold={self.fold!r} must be an integer >= 2 (2 = matrix, 3 = cube, ...).")
        if self.factorization in ("lora", "kronecker") and self.fold != 2:
            raise ValueError(
                f"factorization={self.factorization!r} needs fold=2 (got fold={self.fold}); "
                "use factorization='tucker' for fold >= 3."
            )
        if self.fold_shape is not None:
            if not isinstance(self.groups, int):
                raise ValueError("fold_shape needs integer groups (weight-aligned chunks differ in size); set groups=G.")
            if len(self.fold_shape) != self.fold or min(self.fold_shape) < 1:
                raise ValueError(
                    f"fold_shape={self.fold_shape} must have fold={self.fold} positive mode sizes."
                )
        if not 0.0 < self.projection_ratio <= 1.0:
            raise ValueError(f"projection_ratio={self.projection_ratio} must be in (0, 1].")
        if self.projection == "none" and self.projection_ratio != 1.0:
            raise ValueError(
                f"projection_ratio={self.projection_ratio} needs a projection; set projection='fastfood' "
                "(or 'gaussian' for small adapters)."
            )
        if self.factorization == "kronecker" and (not isinstance(self.kron_splits, int) or self.kron_splits < 2):
            raise ValueError(f"kron_splits={self.kron_splits!r} must be >= 2 (2 = LoKr, 3+ = LoNKr).")
        if self.kron_factor == 0 or self.kron_factor < -1:
            raise ValueError(f"kron_factor={self.kron_factor} must be a positive size or -1 (balanced).")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list; name at least one module pattern or a preset.")
        if (self.token is not None) != bool(self.token_ids) or (self.token is not None) != (self.token_dim > 0):
            raise ValueError(
                f"token={self.token!r} needs its token_ids and token_dim (got {list(self.token_ids)}, {self.token_dim}); "
                "set all three (the trainer's --train_text_encoder_ti does) or none."
            )

    def _validate_shape_groups(self) -> None:
        """groups="shape" keeps each weight's own axes: nothing may fold, shuffle or project them."""
        if self.factorization != "tucker" or self.fold != 3:
            raise ValueError(
                f"groups='shape' is a Tucker over (layer, d_out, d_in): set factorization='tucker' and fold=3 "
                f"(got factorization={self.factorization!r}, fold={self.fold})."
            )
        if self.shuffle or self.fold_shape is not None:
            raise ValueError("groups='shape' keeps the weights' own axes: turn off shuffle and fold_shape.")

    # --- serialisation (the config lives in file metadata) -------------------------------------------
    @classmethod
    def own_fields(cls) -> list[str]:
        """The SuperLoRA fields, in declaration order: the adapter file header's keys (peft's are not among them)."""
        inherited = {f.name for f in fields(PeftConfig)}
        return [f.name for f in fields(cls) if f.name not in inherited]

    def to_dict(self) -> dict[str, Any]:
        """The adapter file header's config: exactly the SuperLoRA fields, as every release has written them."""
        full = asdict(self)
        d = {name: full[name] for name in self.own_fields()}
        if isinstance(d["target_modules"], set):
            d["target_modules"] = sorted(d["target_modules"])
        if d["fold_shape"] is not None:
            d["fold_shape"] = list(d["fold_shape"])
        for name in ("kernel_axis", "share_axes"):  # likewise files without the kernel axis or shared bases
            if not getattr(self, name):
                del d[name]
        if self.token is None:  # files without pivotal tuning stay readable by releases that predate it
            del d["token"], d["token_ids"], d["token_dim"]
        else:
            d["token_ids"] = list(d["token_ids"])
        return d

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """peft's `adapter_config.json`: the SuperLoRA fields plus peft's own (its loader dispatches on peft_type)."""
        os.makedirs(save_directory, exist_ok=True)
        peft_fields = {f.name: getattr(self, f.name) for f in fields(PeftConfig)}
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            peft_fields["auto_mapping"] = auto_mapping
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(json.dumps({**peft_fields, **self.to_dict()}, indent=2, sort_keys=True))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuperLoRAConfig":
        known = set(cls.own_fields())
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"Unknown SuperLoRA config keys {unknown}: the file was written by a newer "
                "superlora-diffusers; upgrade it."
            )
        return cls(**d)

    # --- the method's special cases ------------------------------------------------------------------
    @classmethod
    def lora(cls, rank: int = 4, alpha: float | None = None, **kw: Any) -> "SuperLoRAConfig":
        """Plain LoRA: one A·Bᵀ per weight in its native shape."""
        return cls(factorization="lora", rank=rank, alpha=alpha, groups="weight", fold=2, **kw)

    @classmethod
    def lokr(cls, rank: int = 4, alpha: float | None = None, factor: int = -1, **kw: Any) -> "SuperLoRAConfig":
        """LoKr (as in LyCORIS / peft): w1 ⊗ (w2_a·w2_b) per weight."""
        return cls(factorization="kronecker", rank=rank, alpha=alpha, groups="weight", kron_splits=2,
                   kron_factor=factor, **kw)

    @classmethod
    def group_lora(cls, groups: int, rank: int = 4, alpha: float | None = None, **kw: Any) -> "SuperLoRAConfig":
        """Group-wise LoRA: G near-square chunks of the super-vector, each A·Bᵀ."""
        return cls(factorization="lora", rank=rank, alpha=alpha, groups=groups, fold=2, **kw)

    @classmethod
    def lonkr(cls, splits: int = 3, groups: int = 1, rank: int = 4, alpha: float | None = None,
              factor: int = -1, **kw: Any) -> "SuperLoRAConfig":
        """LoNKr: each chunk a Kronecker product of `splits` (low-rank) factors."""
        return cls(factorization="kronecker", rank=rank, alpha=alpha, groups=groups, kron_splits=splits,
                   kron_factor=factor, **kw)

    @classmethod
    def lorta(cls, fold: int = 3, groups: int = 1, rank: int = 4, alpha: float | None = None,
              **kw: Any) -> "SuperLoRAConfig":
        """LoRTA: each chunk folded into an M-way tensor and Tucker-factored (core r^M + M factor matrices)."""
        return cls(factorization="tucker", rank=rank, alpha=alpha, groups=groups, fold=fold, **kw)


PRESETS: dict[str, dict[str, Any]] = {
    # name -> SuperLoRAConfig kwargs; every entry is one row of the method's special-case table.
    "lora": dict(factorization="lora", groups="weight", fold=2),
    "lokr": dict(factorization="kronecker", groups="weight", kron_splits=2),
    "group-lora": dict(factorization="lora", groups=4, fold=2),
    "lonkr": dict(factorization="kronecker", groups=1, kron_splits=3),
    "lorta": dict(factorization="tucker", groups=1, fold=3),
    # group-wise without reshape (axes.py): rank 1 spans the toy's UNet attention, ResNet convs and CLIP
    # attention in 12,738 parameters, a twelfth of LoRA r=4 (docs/benchmarks.md, "Tiny adapters")
    "tucker-axes": dict(factorization="tucker", groups="shape", fold=3, rank=1),
    # the same with the convs' kernel as an axis and the bases shared by axis length (`share_axes`): rank 6 spans
    # those layers in 12,249 parameters and learns more of a subject than rank-1 `tucker-axes` (docs, "Shared bases")
    "tucker-axes-shared": dict(factorization="tucker", groups="shape", fold=3, rank=6, kernel_axis=True,
                               share_axes=True),
}


def config_from_preset(name: str, **overrides: Any) -> SuperLoRAConfig:
    """Build a config from a preset name, with explicit overrides taking precedence."""
    if name not in PRESETS:
        raise ValueError(f"Unknown SuperLoRA preset {name!r}; choose one of {sorted(PRESETS)}.")
    return SuperLoRAConfig(**{**PRESETS[name], **overrides})
