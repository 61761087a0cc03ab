"""Which SuperLoRA a run trains: the preset and flags, or the best measured recipe for `--param_budget`."""

from __future__ import annotations

import contextlib

from ..config import PRESETS, SuperLoRAConfig, config_from_preset
from ..superlora import count_parameters
from ..targets import PRESETS as TARGET_PRESETS, with_text_encoder
from .config import TrainingConfig, TrainingError


def adapter_config(cfg: TrainingConfig, shapes_for, token_parameters: int = 0,
                   kernels_for=None) -> tuple[SuperLoRAConfig, str]:
    """The config the flags ask for, and a sentence saying how it was chosen.

    `shapes_for(target_modules)` returns the (d_out, d_in) list of those targets (and `kernels_for` their
    k_h·k_w, for the kernel-axis recipe; None: all Linear), so a budget can be met exactly before anything is
    injected; `token_parameters` is the size of the identifier's embedding, which `--param_budget` counts when
    `--train_text_encoder_ti` trains it.
    """
    targets = cfg.target_modules or "unet"
    if targets not in TARGET_PRESETS:  # module-name patterns, one or comma-separated (as the peft adapters read them)
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if cfg.train_text_encoder:
        try:
            targets = with_text_encoder(targets)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    if cfg.param_budget is not None:
        ti = cfg.train_text_encoder_ti
        config, why = choose_config_for_budget(cfg.param_budget - (token_parameters if ti else 0),
                                               shapes_for(targets), target_modules=targets, pivotal=ti,
                                               kernels=kernels_for(targets) if kernels_for else None)
        return config, f"--param_budget {cfg.param_budget}: {why}: {describe(config)}"
    overrides = {k: getattr(cfg, k) for k in ("factorization", "rank", "alpha", "fold", "shuffle", "projection",
                                              "projection_ratio", "kron_splits", "kron_factor", "kernel_axis",
                                              "share_axes", "projection_seed")
                 if getattr(cfg, k) is not None}
    if cfg.groups is not None:
        overrides["groups"] = cfg.groups if cfg.groups in ("weight", "shape") else int(cfg.groups)
    if overrides.get("projection_ratio", 1.0) < 1.0 and "projection" not in overrides:
        overrides["projection"] = "fastfood"
    preset_defaults = {"rank": 4} if cfg.superlora_preset != "lorta" else {"rank": 4, "groups": 4}
    preset_defaults = {k: v for k, v in preset_defaults.items() if k not in PRESETS[cfg.superlora_preset]}
    try:
        config = config_from_preset(cfg.superlora_preset, target_modules=targets, **{**preset_defaults, **overrides})
    except ValueError as e:
        raise TrainingError(str(e)) from None
    return config, f"preset {cfg.superlora_preset!r}: {describe(config)}"


def describe(config: SuperLoRAConfig) -> str:
    parts = [config.factorization, f"rank={config.rank}", f"groups={config.groups}", f"fold={config.fold}"]
    parts += [name for name in ("kernel_axis", "share_axes") if getattr(config, name)]
    if config.factorization == "kronecker":
        parts.append(f"kron_splits={config.kron_splits}")
    if config.shuffle:
        parts.append("shuffle")
    if config.projection != "none":
        parts.append(f"{config.projection} ρ={config.projection_ratio}")
    return " ".join(parts)


# Recipes measured by benchmarks/quality.py (UNet attention + ResNet convs + CLIP attention, 1,500 steps, prior
# loss; docs/benchmarks.md, "Tiny adapters"), best first, with and without pivotal tuning: the shared Tucker axes
# layout learns a subject only beside the identifier's embedding, while per-weight LoRA r=1 does without it; with
# the convs' kernel as its own axis and the bases shared by axis length it learns most per parameter (rank 6, then
# rank 4, then rank 2: 0.29 at 2,502 on the toy, ahead of the kernel axis alone at rank 1, 0.25 at 3,237, which
# still beats the cube G=12).
MEASURED_RECIPES: dict[bool, list[tuple[str, dict]]] = {
    True: [("lora", {"rank": 4}), ("tucker-axes-shared", {}), ("tucker-axes", {}), ("lora", {"rank": 1}),
           ("tucker-axes-shared", {"rank": 4}), ("tucker-axes-shared", {"rank": 2}),
           ("tucker-axes", {"kernel_axis": True}),
           ("tucker-axes-shared", {"rank": 4, "projection": "fastfood", "projection_ratio": 0.22784}),
           ("lorta", {"groups": 12, "rank": 5})],
    False: [("lora", {"rank": 4}), ("lora", {"rank": 1}), ("tucker-axes", {}), ("lorta", {"groups": 12, "rank": 5})],
}


# Measured on UNet + CLIP attention alone (no convs), with the embedding (docs/benchmarks.md, "The slices"): the
# rank-16 axes layout read through an isometric vector of half its entries (15,000 on the toy) led every recipe there,
# UniLoRA 15k included; then rank 10 trained whole. Below them nothing measured on that slice learnt a subject.
ATTENTION_RECIPES: list[tuple[str, dict]] = [
    ("tucker-axes", {"rank": 16, "projection": "isometric", "projection_ratio": 0.50393}),
    ("tucker-axes", {"rank": 10})]


def choose_config_for_budget(budget: int, shapes: list[tuple[int, int]], target_modules="unet",
                             pivotal: bool = False, kernels: list[int] | None = None) -> tuple[SuperLoRAConfig, str]:
    """The best measured recipe (`MEASURED_RECIPES`; first `ATTENTION_RECIPES` when `kernels` shows no conv) that fits
    the budget, and a few words on how it was chosen.

    Below every measured recipe: the candidate with the most trainable parameters that fits, among per-weight
    LoRA, Tucker (fold 3-5, G in 1..12), then Tucker with Fastfood projection (ρ = 0.1, 0.01).
    """
    attention_only = kernels is not None and all(k == 1 for k in kernels)  # no conv among the targets
    for preset, overrides in (ATTENTION_RECIPES if pivotal and attention_only else []) + MEASURED_RECIPES[pivotal]:
        config = config_from_preset(preset, target_modules=target_modules, **overrides)
        with contextlib.suppress(ValueError):  # a layout these shapes cannot take is simply not a candidate
            if count_parameters(config, shapes, kernels) <= budget:
                return config, f"the best measured recipe that fits ({preset})"
    candidates: list[SuperLoRAConfig] = []
    for rank in range(1, 65):
        candidates.append(SuperLoRAConfig.lora(rank=rank, target_modules=target_modules))
    for fold in (3, 4, 5):
        for groups in (1, 2, 4, 8, 12):
            for rank in range(1, 17):
                candidates.append(SuperLoRAConfig.lorta(fold=fold, groups=groups, rank=rank, target_modules=target_modules))
    for ratio in (0.1, 0.01):
        for fold in (3, 4, 5, 6, 8):
            for rank in range(1, 9):
                candidates.append(SuperLoRAConfig.lorta(fold=fold, groups=1, rank=rank, projection="fastfood",
                                                        projection_ratio=ratio, target_modules=target_modules))
    best, best_count = None, -1
    for config in candidates:
        try:
            n = count_parameters(config, shapes)
        except ValueError:
            continue
        if best_count < n <= budget:
            best, best_count = config, n
    if best is None:
        raise TrainingError(f"--param_budget is below the smallest SuperLoRA for these targets ({budget} left for the "
                            "factors); raise it.")
    return best, "below every measured recipe, the largest configuration that fits (not measured)"

