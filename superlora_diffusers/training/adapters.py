"""What a run trains: one shared SuperLoRA (default) or a peft method on the same layers (`--adapter`).

Both expose what the loop needs: the trainable parameters (in one module, for EMA and checkpoints), a way to
switch the adapter off (the prior target), one file to checkpoint, and the final files in the format their
loader reads: `pipe.load_superlora_weights` for SuperLoRA, `pipe.load_lora_weights` for peft LoRA, and
peft's own folder (`PeftModel.from_pretrained`) for the others, which diffusers' loaders do not read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..serialization import WEIGHT_NAME
from ..superlora import lora_parameter_count, versus_lora1
from ..targets import layer_shape
from ..tokens import token_ids_for
from .adapter import adapter_config, describe
from .config import TrainingConfig, TrainingError

logger = logging.getLogger("superlora.dreambooth")
PEFT_METHODS = {"lora": "LoraConfig", "lokr": "LoKrConfig", "loha": "LoHaConfig", "vera": "VeraConfig",
                "vblora": "VBLoRAConfig", "unilora": "UniLoraConfig", "tinylora": "TinyLoraConfig",
                "trainable_tokens": "TrainableTokensConfig"}
UNET_ATTENTION = r"to_q|to_k|to_v|to_out\.0"
UNET_CONV = r"resnets\.\d+\.conv1|resnets\.\d+\.conv2"
CLIP_ATTENTION = r"q_proj|k_proj|v_proj|out_proj"
PEFT_FOLDER_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained writes
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
EMBEDDING_GROUP = "embedding"  # the optimizer group of pivotal tuning's embedding, which can stop before the adapter


class SuperLoRAAdapter:
    """The one shared SuperLoRA over the UNet (and text encoder): the project's own adapter."""

    weight_name, ema_weight_name = WEIGHT_NAME, "superlora_weights_ema.safetensors"
    title, load_code = "SuperLoRA", 'pipe.load_superlora_weights("{out}")'

    def __init__(self, cfg: TrainingConfig, tokenizer, unet: nn.Module, text_encoder: nn.Module) -> None:
        from ..components import inject_superlora, target_kernels, target_shapes

        self.components = components = {"unet": unet, "text_encoder": text_encoder}
        token_ids = tuple(token_ids_for(tokenizer, cfg.token_abstraction))
        token_dim = text_encoder.get_input_embeddings().embedding_dim
        config, self.how = adapter_config(cfg, lambda targets: target_shapes(components, targets),
                                          len(token_ids) * token_dim,
                                          kernels_for=lambda targets: target_kernels(components, targets))
        if cfg.train_text_encoder_ti:  # pivotal tuning: the identifier's embedding offsets live in the same module
            config = dataclasses.replace(config, token=cfg.token_abstraction, token_ids=token_ids, token_dim=token_dim)
        self.config, self.module = config, inject_superlora(components, config)
        self.targets, self.metadata = self.module.targets, self.module.metadata
        self.shapes, self.entries = self.module.shapes, self.module.layout.total
        self.n_params = self.module.num_parameters()

    def param_groups(self, lr: float, ti_lr: float, zero_ratio: float = 1.0) -> list[dict]:
        """The factors at `lr`, the zero-initialised ones at `lr * zero_ratio` (LoRA+), the embedding at `ti_lr`."""
        token_params = list(self.module.tokens.parameters()) if self.config.token is not None else []
        zero = self.module.zero_initialised() if zero_ratio != 1 else []
        if zero_ratio != 1 and not zero:
            raise TrainingError("--loraplus_lr_ratio needs a zero-initialised factor; a projected axes layout trains one "
                                "vector that moves every factor: drop --loraplus_lr_ratio or --projection.")
        special = {id(p) for p in token_params + zero}
        groups = [{"params": [p for p in self.module.parameters() if p.requires_grad and id(p) not in special],
                   "lr": lr}]
        if zero:
            groups.append({"params": zero, "lr": lr * zero_ratio})
        if token_params:  # the embedding offsets at their own rate (diffusers' --text_encoder_lr)
            groups.append({"params": token_params, "lr": ti_lr, "name": EMBEDDING_GROUP})
        return groups

    def disabled(self):
        from ..components import disabled

        return disabled(self.components)

    def save(self, path: Path, extra: dict[str, str] | None = None) -> None:
        from ..serialization import save_superlora_file

        save_superlora_file(path, self.module, self.targets, {**self.metadata, **(extra or {})}, overwrite=True)

    def export(self, output_dir: Path, extra: dict[str, str]) -> Path:
        """The final file, for `pipe.load_superlora_weights(output_dir)`."""
        self.save(output_dir / self.weight_name, extra)
        return output_dir / self.weight_name

    def load(self, path: Path) -> None:
        from ..serialization import parse_superlora, read_superlora_file

        self.module.load_state_dict(parse_superlora(*read_superlora_file(path), source=repr(str(path))).state_dict)

    def load_into(self, pipe, weights: Path) -> None:
        pipe.load_superlora_weights(str(weights.parent), weight_name=weights.name)

    def describe(self) -> str:
        return f"{describe(self.config)}; targets: {self.config.target_modules}"

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()


class PeftAdapter:
    """A peft method (`--adapter lora`, `vera`, ...) on the same layers, one peft model over UNet and text encoder
    (`get_peft_model` on a ModuleDict), so the shared-state tuners share their state across both, as SuperLoRA.
    The identifier's embedding trains through peft too: alone as `TrainableTokensConfig` (`--adapter
    trainable_tokens`, textual inversion), or beside LoRA as its `trainable_token_indices` (pivotal tuning)."""

    ema_weight_name = "adapter_model_ema.safetensors"

    def __init__(self, cfg: TrainingConfig, tokenizer, unet: nn.Module, text_encoder: nn.Module) -> None:
        import peft

        self.kind = cfg.adapter
        models = {} if self.kind == "trainable_tokens" else {"unet": unet}
        if cfg.train_text_encoder or cfg.trains_embedding:
            models["text_encoder"] = text_encoder
        self.components = list(models)
        embedding = "text_encoder." + next(n for n, m in text_encoder.named_modules()
                                           if m is text_encoder.get_input_embeddings())
        token_ids = token_ids_for(tokenizer, cfg.token_abstraction) if cfg.trains_embedding else []
        try:
            if self.kind == "trainable_tokens":
                self.config = peft.TrainableTokensConfig(token_indices=token_ids, target_modules=[embedding])
            else:
                extra = {"trainable_token_indices": {embedding: token_ids}} if token_ids else {}
                self.config = getattr(peft, PEFT_METHODS[self.kind])(target_modules=peft_targets(cfg),
                                                                     **peft_kwargs(cfg), **extra)
            self.model = peft.get_peft_model(nn.ModuleDict(models), self.config)
        except (TypeError, ValueError) as e:  # peft's own check of a size or an option, as one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"--adapter {self.kind}: {first} (set its options with --peft_kwargs).") from None
        self.module = self.model  # its trainable parameters are the adapter's
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        token_layer = peft.tuners.trainable_tokens.TrainableTokensLayer
        layers = [m.get_base_layer() for m in self.model.modules()
                  if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) and not isinstance(m, token_layer)]
        self.shapes = [layer_shape(layer) for layer in layers]
        self.entries = sum(d_out * d_in for d_out, d_in in self.shapes)
        self.how = f"peft {PEFT_METHODS[self.kind]} on {len(layers)} layers" + (
            f" + the embedding of {cfg.token_abstraction!r} ({len(token_ids)} token(s))" if token_ids else "")
        # diffusers' LoRA file has no place for token rows: with them, LoRA is saved as peft's folder too
        self.diffusers_lora = self.kind == "lora" and not token_ids
        self.weight_name = LORA_WEIGHTS if self.diffusers_lora else PEFT_FOLDER_WEIGHTS
        self.title = f"peft {PEFT_METHODS[self.kind].removesuffix('Config')}"
        self.load_code = ('pipe.load_lora_weights("{out}")' if self.diffusers_lora else
                          "from peft import PeftModel\nPeftModel.from_pretrained(torch.nn.ModuleDict({{"
                          + ", ".join(f'"{c}": pipe.{c}' for c in self.components) + '}}), "{out}")')

    def param_groups(self, lr: float, ti_lr: float, zero_ratio: float = 1.0) -> list[dict]:
        """The adapter at `lr` (LoRA's B at `lr * zero_ratio`, as peft's LoRA+); token rows beside it at `ti_lr`, alone
        at `lr`. peft trains the rows themselves (not offsets), so they get no weight decay: decay would pull the
        word's embedding to zero, not to the base."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        tokens = [p for n, p in named if "trainable_tokens_delta" in n]
        zero = [p for n, p in named if "lora_B" in n] if zero_ratio != 1 else []
        special = {id(p) for p in tokens + zero}
        groups = [{"params": [p for n, p in named if id(p) not in special], "lr": lr},
                  {"params": zero, "lr": lr * zero_ratio}]
        if tokens:
            groups.append({"params": tokens, "lr": lr if self.kind == "trainable_tokens" else ti_lr,
                           "weight_decay": 0.0, "name": EMBEDDING_GROUP})
        return [g for g in groups if g["params"]]

    def disabled(self):
        return self.model.disable_adapter()

    def state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def save(self, path: Path, extra: dict[str, str] | None = None) -> None:
        """A checkpoint's file: peft's state dict, read back by `load`."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.state(), str(path), metadata={"format": "pt"})

    def export(self, output_dir: Path, extra: dict[str, str]) -> Path:
        """The final files: diffusers' LoRA file for LoRA (`pipe.load_lora_weights(output_dir)`), else peft's
        folder (adapter_config.json + adapter_model.safetensors, `PeftModel.from_pretrained`)."""
        if not self.diffusers_lora:
            self.model.save_pretrained(output_dir)
            return _shared(output_dir / self.weight_name)
        from diffusers import StableDiffusionPipeline

        state = {k.removeprefix("base_model.model."): v for k, v in self.state().items()}
        parts = {c: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(c + ".")}
                 for c in ("unet", "text_encoder")}
        # the config beside the weights (diffusers reads it back), so a --lora_alpha other than --rank survives
        meta = {c: {"r": self.config.r, "lora_alpha": self.config.lora_alpha,
                    "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in part})} for c, part in parts.items()}
        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts["text_encoder"] or None,
            unet_lora_adapter_metadata=meta["unet"],
            text_encoder_lora_adapter_metadata=meta["text_encoder"] if parts["text_encoder"] else None)
        return _shared(output_dir / self.weight_name)

    def load(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(path)))

    def load_into(self, pipe, weights: Path) -> None:
        if self.diffusers_lora:
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
            return
        from peft import PeftModel

        PeftModel.from_pretrained(nn.ModuleDict({c: getattr(pipe, c) for c in self.components}), str(weights.parent))

    def describe(self) -> str:
        return f"peft {PEFT_METHODS[self.kind]}; targets: {self.config.target_modules}"

    def config_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.config.to_dict(), default=str))


def peft_targets(cfg: TrainingConfig) -> str:
    """The project's target presets as one peft regex (full-match on module names), text encoder included."""
    preset = cfg.target_modules or "unet"
    if preset in ("unet", "unet+text"):
        parts = [rf"unet\..*\.({UNET_ATTENTION})"]
    elif preset == "unet-cross":
        parts = [rf"unet\..*\.attn2\.({UNET_ATTENTION})"]
    elif preset in ("unet+conv", "unet+conv+text"):  # lora, lokr, loha (validate() refuses the others)
        parts = [rf"unet\..*\.({UNET_ATTENTION}|{UNET_CONV})"]
    else:
        parts = [rf".*(?:{t.strip()})" for t in preset.split(",") if t.strip()]
    if cfg.train_text_encoder:
        parts.append(rf"text_encoder\..*\.({CLIP_ATTENTION})")
    return "|".join(f"(?:{p})" for p in parts)


def peft_kwargs(cfg: TrainingConfig) -> dict[str, Any]:
    """Rank and alpha under each method's own names (diffusers' `--rank`, `--lora_alpha`), plus --peft_kwargs."""
    rank = cfg.rank or 4
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else rank
    own = {"lora": {"r": rank, "lora_alpha": alpha, "init_lora_weights": "gaussian"},
           "lokr": {"r": rank, "alpha": alpha}, "loha": {"r": rank, "alpha": alpha}, "vera": {"r": rank},
           "vblora": {"r": rank}, "unilora": {"r": rank}, "tinylora": {"r": rank}}[cfg.adapter]
    try:
        extra = json.loads(cfg.peft_kwargs) if cfg.peft_kwargs else {}
    except json.JSONDecodeError as e:
        raise TrainingError(f"--peft_kwargs is not JSON ({e.msg}); pass e.g. '{{\"num_vectors\": 27}}'.") from None
    return {**own, **extra}


def build_adapter(cfg: TrainingConfig, tokenizer, unet: nn.Module, text_encoder: nn.Module, log: bool = True):
    """The adapter `--adapter` names, attached to the models, with its size logged."""
    if cfg.adapter == "superlora":
        adapter = SuperLoRAAdapter(cfg, tokenizer, unet, text_encoder)
    else:
        adapter = PeftAdapter(cfg, tokenizer, unet, text_encoder)
    adapter.lora1 = lora_parameter_count(adapter.shapes)
    if not log:
        return adapter
    logger.info("%s %s", "SuperLoRA" if cfg.adapter == "superlora" else "adapter:", adapter.how)
    logger.info("adapting %d weights (%s entries); trainable parameters: %s (~%.1f KB as fp32); "
                "a rank-1 LoRA of the same targets: %s (%s)", len(adapter.shapes), f"{adapter.entries:,}",
                f"{adapter.n_params:,}", 4 * adapter.n_params / 1024, f"{adapter.lora1:,}",
                versus_lora1(adapter.n_params, adapter.lora1))
    return adapter


def _shared(path: Path) -> Path:
    """Give a file written by diffusers' or peft's savers the user's umask (they may leave tempfile's 0600)."""
    from ..serialization import umask_mode

    path.chmod(umask_mode(0o666))
    return path

