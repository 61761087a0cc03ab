"""`TrainingConfig`: every option of a DreamBooth run, the single source of truth for the flags.

Each field is one command-line flag of the same name (`--field_name`), named as in diffusers'
`train_dreambooth_lora.py` where it has one; `build_parser()` is generated from the fields, so `--help`
cannot drift from what `train(config)` reads. Scripts, the CLI, the app and the benchmarks build a
`TrainingConfig` and call `train(config)`; none of them passes argv strings around.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from ..config import FACTORIZATIONS, PRESETS, PROJECTIONS


class TrainingError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def option(default: Any, help: str = "", group: str = "", choices: list | None = None, required: bool = False):
    """A config field with its flag's help text, group and choices."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "required": required})


MODEL, DATA, ADAPTER, OPTIM, VALID, OUTPUT = "model", "data", "SuperLoRA", "optimisation", "validation", "output and checkpoints"


@dataclass
class TrainingConfig:
    """One DreamBooth run of one shared SuperLoRA (see `--help` for each field)."""

    # model
    pretrained_model_name_or_path: str = option("toy", "diffusers folder or hub id; 'toy' = the embedded default base "
                                                "model", MODEL)
    revision: str | None = option(None, group=MODEL)
    variant: str | None = option(None, group=MODEL)
    tokenizer_name: str | None = option(None, group=MODEL)
    # data
    instance_data_dir: str | None = option(None, "3-10 images of the subject (+ optional <image>.txt captions)", DATA,
                                           required=True)
    instance_prompt: str | None = option(None, "e.g. 'a photo of sks star'", DATA, required=True)
    class_data_dir: str | None = option(None, "class images for prior preservation (generated if too few)", DATA)
    class_prompt: str | None = option(None, "e.g. 'a photo of a star'", DATA)
    with_prior_preservation: bool = option(False, group=DATA)
    prior_loss_weight: float = option(1.0, group=DATA)
    prior_loss_target: str = option("noise", "what the class batch regresses to: the sampled noise (DreamBooth), or "
                                    "the frozen base model's own prediction for it (adapter off), which pins class "
                                    "prompts to the base directly", DATA, ["noise", "base_model"])
    num_class_images: int = option(100, group=DATA)
    sample_batch_size: int = option(4, "batch size when generating class images", DATA)
    prior_generation_precision: str | None = option(None, "accepted for diffusers' command lines; class images are "
                                                    "generated in the training precision", DATA,
                                                    ["no", "fp32", "fp16", "bf16"])
    resolution: int | None = option(None, "default: the base model's native size", DATA)
    center_crop: bool = option(False, group=DATA)
    random_flip: bool = option(False, group=DATA)
    repeats: int = option(1, "repeat the instance images this many times per epoch", DATA)
    caption_extension: str = option(".txt", "per-image caption files <image><ext> override the prompt", DATA)
    # the adapter
    adapter: str = option("superlora", "what trains: one shared SuperLoRA, a peft method on the same layers (saved "
                          "for pipe.load_lora_weights for lora, else as peft's folder), or trainable_tokens: the "
                          "embedding of --token_abstraction alone (textual inversion, at --learning_rate)", ADAPTER,
                          ["superlora", "lora", "lokr", "loha", "vera", "vblora", "unilora", "tinylora",
                           "trainable_tokens"])
    lora_alpha: float | None = option(None, "peft methods: their alpha (default: --rank)", ADAPTER)
    peft_kwargs: str | None = option(None, "peft methods: more fields of their config, as JSON (e.g. VB-LoRA's "
                                     "'{\"num_vectors\": 27, \"vector_length\": 32}')", ADAPTER)
    superlora_preset: str = option("lorta", "special case of the method to start from; the flags below override it",
                                   ADAPTER, sorted(PRESETS))
    param_budget: int | None = option(None, "the best measured recipe that fits this many trainable parameters (the "
                                      "embedding of --train_text_encoder_ti included); below all of them, the "
                                      "largest configuration that fits", ADAPTER)
    factorization: str | None = option(None, group=ADAPTER, choices=list(FACTORIZATIONS))
    rank: int | None = option(None, "SuperLoRA's rank over the preset's; peft methods' r (default 4)", ADAPTER)
    alpha: float | None = option(None, "ΔW is scaled by alpha/rank (default alpha = rank)", ADAPTER)
    groups: str | None = option(None, "number of groups G, 'weight' for one per weight, or 'shape' for a Tucker over "
                                "(layer, d_out, d_in) of each shape's weights (with --factorization tucker --fold 3)",
                                ADAPTER)
    kernel_axis: bool | None = option(None, "with --groups shape: a conv's kernel (k_h*k_w) is a Tucker axis of its "
                                      "own, not part of d_in (fewer parameters per rank on the ResNet convs)", ADAPTER)
    share_axes: bool | None = option(None, "with --groups shape: one basis per axis length, shared by every shape "
                                     "(each shape keeps only its core and layer factor: the smallest layouts)", ADAPTER)
    fold: int | None = option(None, "fold each group into an M-way tensor", ADAPTER)
    shuffle: bool | None = option(None, group=ADAPTER)
    projection: str | None = option(None, group=ADAPTER, choices=list(PROJECTIONS))
    projection_ratio: float | None = option(None, group=ADAPTER)
    projection_seed: int | None = option(None, "seed of the fixed random projection (and, in the axes layout, of the "
                                         "factors' starting point θ0); regenerated from the file, never stored", ADAPTER)
    kron_splits: int | None = option(None, group=ADAPTER)
    kron_factor: int | None = option(None, group=ADAPTER)
    target_modules: str | None = option(None, "preset ('unet', 'unet-cross', 'unet+conv' [adds the ResNet convs, "
                                        "LoCon-style], 'unet+text', 'unet+conv+text') or comma-separated module-name "
                                        "regexes; --train_text_encoder adds the text encoder's attention to any of "
                                        "them", ADAPTER)
    train_text_encoder: bool = option(False, "the shared SuperLoRA also spans the text encoder's attention "
                                      "('unet+conv' becomes 'unet+conv+text'), and the text encoder runs every step",
                                      ADAPTER)
    train_text_encoder_ti: bool = option(False, "pivotal tuning: also train the input embedding of "
                                         "--token_abstraction (SuperLoRA: an offset per token id; peft LoRA: its "
                                         "trainable_token_indices; saved in the adapter file); the text encoder runs "
                                         "every step", ADAPTER)
    token_abstraction: str = option("sks", "with --train_text_encoder_ti: the identifier word of --instance_prompt "
                                    "whose embedding trains", ADAPTER)
    text_encoder_lr: float | None = option(None, "with --train_text_encoder_ti: the embedding's learning rate "
                                           "(default: --learning_rate)", ADAPTER)
    train_text_encoder_ti_frac: float = option(1.0, "with --train_text_encoder_ti: the share of the steps the "
                                               "embedding trains; after it only the adapter does, around the pivot "
                                               "the embedding found (diffusers' advanced script defaults to 0.5)",
                                               ADAPTER)
    # optimisation
    train_batch_size: int = option(4, group=OPTIM)
    num_train_epochs: int = option(1, group=OPTIM)
    max_train_steps: int | None = option(None, "overrides num_train_epochs", OPTIM)
    gradient_accumulation_steps: int = option(1, group=OPTIM)
    gradient_checkpointing: bool = option(False, group=OPTIM)
    learning_rate: float = option(1e-3, group=OPTIM)
    loraplus_lr_ratio: float = option(1.0, "LoRA+ (peft's create_loraplus_optimizer): the zero-initialised factor "
                                      "(SuperLoRA's cores or B, peft LoRA's lora_B) trains at --learning_rate x this",
                                      OPTIM)
    scale_lr: bool = option(False, group=OPTIM)
    lr_scheduler: str = option("constant", group=OPTIM, choices=["linear", "cosine", "cosine_with_restarts",
                                                                  "polynomial", "constant", "constant_with_warmup"])
    lr_warmup_steps: int = option(0, group=OPTIM)
    lr_num_cycles: int = option(1, group=OPTIM)
    lr_power: float = option(1.0, group=OPTIM)
    use_8bit_adam: bool = option(False, group=OPTIM)
    adam_beta1: float = option(0.9, group=OPTIM)
    adam_beta2: float = option(0.999, group=OPTIM)
    adam_weight_decay: float = option(1e-2, group=OPTIM)
    adam_epsilon: float = option(1e-8, group=OPTIM)
    max_grad_norm: float = option(1.0, group=OPTIM)
    use_ema: bool = option(False, "save and validate an exponential moving average of the factors (as diffusers' "
                           "text-to-image)", OPTIM)
    ema_decay: float = option(0.99, "with --use_ema; about 1/(1-decay) steps averaged", OPTIM)
    snr_gamma: float | None = option(None, "Min-SNR loss weighting (5.0 is typical)", OPTIM)
    noise_offset: float = option(0.0, group=OPTIM)
    timestep_bias_strategy: str = option("none", "sample some timesteps more often (diffusers' SDXL scripts): "
                                         "'earlier' (less noise: detail), 'later' (more noise: layout), 'range'",
                                         OPTIM, choices=["none", "earlier", "later", "range"])
    timestep_bias_multiplier: float = option(1.0, "how much more often the biased timesteps are drawn", OPTIM)
    timestep_bias_portion: float = option(0.25, "with 'earlier'/'later': the share of the timesteps biased", OPTIM)
    timestep_bias_begin: int = option(0, "with 'range': the first biased timestep", OPTIM)
    timestep_bias_end: int = option(1000, "with 'range': the biased timesteps end before this one", OPTIM)
    allow_tf32: bool = option(False, group=OPTIM)
    mixed_precision: str | None = option(None, group=OPTIM, choices=["no", "fp16", "bf16"])
    enable_xformers_memory_efficient_attention: bool = option(False, group=OPTIM)
    seed: int = option(0, group=OPTIM)
    # validation
    validation_prompt: str | None = option(None, group=VALID)
    num_validation_images: int = option(4, group=VALID)
    validation_steps: int = option(100, "validate every N optimizer steps", VALID)
    num_inference_steps: int = option(25, group=VALID)
    guidance_scale: float = option(5.0, group=VALID)
    # output and checkpoints
    output_dir: str = option("superlora-dreambooth-model", group=OUTPUT)
    overwrite_output_dir: bool = option(False, "allow replacing weights already in output_dir", OUTPUT)
    checkpointing_steps: int = option(500, group=OUTPUT)
    checkpoints_total_limit: int | None = option(None, group=OUTPUT)
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint-N directory", OUTPUT)
    report_to: str = option("tensorboard", "tensorboard, wandb, all, or none", OUTPUT)
    logging_dir: str = option("logs", "relative to output_dir", OUTPUT)

    @property
    def trains_embedding(self) -> bool:
        """Whether the identifier's input embedding trains (so the text encoder runs every step)."""
        return self.train_text_encoder_ti or self.adapter == "trainable_tokens"

    def validate(self) -> "TrainingConfig":
        """Refuse contradictory or impossible settings before anything loads; returns self."""
        for name in ("instance_data_dir", "instance_prompt"):
            if not getattr(self, name):
                raise TrainingError(f"--{name} is required.")
        if self.with_prior_preservation and (not self.class_prompt or not self.class_data_dir):
            raise TrainingError("--with_prior_preservation needs --class_prompt and --class_data_dir.")
        if self.prior_loss_target != "noise" and not self.with_prior_preservation:
            raise TrainingError(f"--prior_loss_target {self.prior_loss_target} acts on the class batch; add "
                                "--with_prior_preservation (with --class_prompt and --class_data_dir).")
        for name in ("train_batch_size", "gradient_accumulation_steps", "repeats", "num_train_epochs",
                     "checkpointing_steps", "validation_steps"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            fixed = max(8, -(-self.resolution // 8) * 8)  # the next multiple up
            raise TrainingError(f"--resolution must be a positive multiple of 8 (diffusers' pipelines refuse others "
                                f"at validation), got {self.resolution}; use {fixed}.")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise TrainingError(f"--max_train_steps must be >= 1, got {self.max_train_steps}.")
        if self.trains_embedding and self.token_abstraction not in self.instance_prompt.split():
            raise TrainingError(f"--token_abstraction {self.token_abstraction!r} is not a word of --instance_prompt "
                                f"{self.instance_prompt!r}; name the identifier word the prompt uses.")
        if self.adapter != "superlora" and self.param_budget is not None:
            raise TrainingError(f"--adapter {self.adapter} trains a peft method; --param_budget is SuperLoRA's (drop "
                                "it, or use --adapter superlora).")
        if self.adapter == "trainable_tokens" and (self.train_text_encoder or self.train_text_encoder_ti):
            raise TrainingError("--adapter trainable_tokens trains the embedding of --token_abstraction alone; drop "
                                "--train_text_encoder/--train_text_encoder_ti (or use --adapter lora "
                                "--train_text_encoder_ti for pivotal tuning).")
        if self.train_text_encoder_ti and self.adapter not in ("superlora", "lora"):
            raise TrainingError(f"--train_text_encoder_ti beside --adapter {self.adapter}: peft trains token rows "
                                "beside LoRA only (LoraConfig's trainable_token_indices); use --adapter lora or "
                                "superlora, or drop the flag.")
        if self.timestep_bias_strategy != "none" and (self.timestep_bias_multiplier <= 0
                                                       or not 0 < self.timestep_bias_portion <= 1
                                                       or not 0 <= self.timestep_bias_begin < self.timestep_bias_end):
            raise TrainingError("--timestep_bias_strategy needs --timestep_bias_multiplier > 0, "
                                "--timestep_bias_portion in (0, 1] and 0 <= --timestep_bias_begin < "
                                f"--timestep_bias_end; got {self.timestep_bias_multiplier}, "
                                f"{self.timestep_bias_portion}, {self.timestep_bias_begin}, {self.timestep_bias_end}.")
        if not 0 < self.train_text_encoder_ti_frac <= 1:
            raise TrainingError(f"--train_text_encoder_ti_frac must be in (0, 1], got {self.train_text_encoder_ti_frac}"
                                "; 1 trains the embedding for the whole run, 0.5 for its first half.")
        if self.train_text_encoder_ti_frac != 1 and not self.train_text_encoder_ti:
            raise TrainingError("--train_text_encoder_ti_frac sets when the embedding of pivotal tuning stops "
                                "training; add --train_text_encoder_ti, or drop it.")
        linear_only = self.adapter in ("vera", "vblora", "unilora", "tinylora")
        if linear_only and "conv" in (self.target_modules or ""):
            raise TrainingError(f"--adapter {self.adapter} adapts nn.Linear layers only; drop the convs from "
                                "--target_modules (or train lora, lokr or loha there).")
        if self.loraplus_lr_ratio <= 0:
            raise TrainingError(f"--loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}; 1 trains every factor "
                                "at --learning_rate.")
        if self.loraplus_lr_ratio != 1 and self.adapter not in ("superlora", "lora"):
            raise TrainingError(f"--loraplus_lr_ratio beside --adapter {self.adapter}: LoRA+ needs a zero-initialised "
                                "factor (SuperLoRA or peft LoRA); use one of those, or drop the flag.")
        if not 0 <= self.ema_decay < 1:
            raise TrainingError(f"--ema_decay must be in [0, 1), got {self.ema_decay}; 0.99 averages about 100 steps.")
        return self


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per `TrainingConfig` field, in the fields' order and groups."""
    parser = argparse.ArgumentParser(
        description="DreamBooth a SuperLoRA adapter: one small shared tensor generates every attention ΔW.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainingConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainingConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs: dict[str, Any] = {"default": f.default, "help": meta["help"] or None}
        if meta["required"]:
            kwargs["required"] = True
        hint = hints[f.name]
        if hint is bool:
            kwargs["action"] = "store_true"
        elif hint == (bool | None):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = next(t for t in (int, float, str) if t in typing.get_args(hint) or t is hint)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
        group.add_argument(f"--{f.name}", **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    """The command line (`argv`, default sys.argv) as a validated `TrainingConfig`."""
    return TrainingConfig(**vars(build_parser().parse_args(argv))).validate()
