"""The adapter file: one `.safetensors` holding the trainable factors only, described by its header.

Header metadata (all strings): `format` = "superlora", `format_version`, `config` (JSON of
`SuperLoRAConfig`), `targets` (JSON list of [name, d_out, d_in] in super-vector order), `base_fingerprint`
(hash of those names and shapes), `library_version`, `num_parameters`, and free-form extras such as
`instance_prompt`. Shuffle and projection are regenerated from the config's seeds, never stored, so a
Tucker adapter of a few thousand parameters is a file of a few KB.

`read_superlora_file` + `parse_superlora` validate everything (format, version, config, factor names and
shapes) before a caller touches a pipeline; writes are atomic and never overwrite unless asked.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import SuperLoRAConfig
from .layout import Shape
from .superlora import SuperLoRA, parameter_shapes
from .targets import fingerprint

FORMAT = "superlora"
FORMAT_VERSION = 1
WEIGHT_NAME = "superlora_weights.safetensors"
PREFIX = "superlora."
LORA_KEY_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_te", "lora_unet")


class SuperLoRAFileError(ValueError):
    """A file or state dict that is not a loadable SuperLoRA; the message says why and what to do."""


@dataclass
class SuperLoRAFile:
    """A parsed, validated adapter: config, ordered targets, factors and the rest of the header."""

    config: SuperLoRAConfig
    targets: list[tuple[str, Shape]]
    state_dict: dict[str, torch.Tensor]  # SuperLoRA.state_dict() names (no prefix)
    metadata: dict[str, str]

    @property
    def shapes(self) -> list[Shape]:
        return [shape for _, shape in self.targets]

    @property
    def kernels(self) -> list[int]:
        """Each target's k_h·k_w (1 for a Linear), from the header's conv kernels."""
        return header_kernels(self.targets, self.metadata)

    def build(self) -> SuperLoRA:
        module = SuperLoRA(self.config, self.shapes, self.kernels)
        module.load_state_dict(self.state_dict)
        return module


def header_kernels(targets: list[tuple[str, Shape]], metadata: dict[str, str]) -> list[int]:
    """k_h·k_w per target from the header's `target_kernels` (conv targets only; a Linear's is 1)."""
    kernels = json.loads(metadata.get("target_kernels", "{}"))
    return [int(kernels[name][0]) * int(kernels[name][1]) if name in kernels else 1 for name, _ in targets]


def build_metadata(module: SuperLoRA, target_names: list[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    from . import __version__

    targets = list(zip(target_names, module.shapes))
    metadata = {str(k): str(v) for k, v in (extra or {}).items()}
    metadata.update({
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(module.config.to_dict()),
        "targets": json.dumps([[n, o, i] for n, (o, i) in targets]),
        "base_fingerprint": fingerprint(targets),
        "library_version": __version__,
        "num_parameters": str(module.num_parameters()),
    })
    return metadata


def to_state_dict(module: SuperLoRA) -> dict[str, torch.Tensor]:
    """The trainable factors as fp32 CPU tensors under `superlora.` keys."""
    return {PREFIX + k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}


def serialize(module: SuperLoRA, target_names: list[str], extra: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(to_state_dict(module), metadata=build_metadata(module, target_names, extra))


def save_superlora_file(path: str | os.PathLike, module: SuperLoRA, target_names: list[str],
                        extra: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write atomically (temp file in the same folder, then rename); refuse to replace a file unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; pass overwrite=True to replace it or choose another path.")
    atomic_write_bytes(path, serialize(module, target_names, extra))
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, then rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o666))  # mkstemp makes 0600; a saved adapter is shared like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask_mode(mode: int) -> int:
    """`mode` under the process's umask: what `open()`/`mkdir()` would give, unlike tempfile's private 0600/0700."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def read_superlora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, with one-line errors for missing or corrupt files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SuperLoRAFileError(f"SuperLoRA file {str(path)!r} not found; pass a folder holding {WEIGHT_NAME} or the file itself.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SuperLoRAFileError(
            f"{str(path)!r} is not a readable safetensors file ({reason}); it may be truncated or corrupt: "
            "copy or export it again."
        ) from None
    return tensors, metadata


def parse_superlora(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                    source: str = "state dict") -> SuperLoRAFile:
    """Validate a SuperLoRA's header and factors against each other (not yet against a pipeline)."""
    metadata = dict(metadata or {})
    if metadata.get("format") != FORMAT:
        if any(marker in key for key in state_dict for marker in LORA_KEY_MARKERS):
            raise SuperLoRAFileError(f"{source} is a LoRA, not a SuperLoRA; load it with pipe.load_lora_weights(...).")
        raise SuperLoRAFileError(
            f"{source} has no SuperLoRA header (metadata 'format' is {metadata.get('format')!r}); it was not written "
            "by superlora-diffusers (save adapters with pipe.save_superlora_weights)."
        )
    try:
        version = int(metadata.get("format_version", ""))
        config = SuperLoRAConfig.from_dict(json.loads(metadata["config"]))
        targets = [(str(n), (int(o), int(i))) for n, o, i in json.loads(metadata["targets"])]
    except KeyError as e:
        raise SuperLoRAFileError(f"{source} lacks the header field {e}; the file is damaged: save or export it again.") from None
    except (ValueError, TypeError) as e:
        if "version" in str(e) or "newer" in str(e):
            raise SuperLoRAFileError(f"{source}: {e}") from None
        raise SuperLoRAFileError(f"{source} has a malformed header ({e}); the file is damaged: save it again.") from None
    if version > FORMAT_VERSION:
        raise SuperLoRAFileError(
            f"{source} uses SuperLoRA format {version}, newer than this library's {FORMAT_VERSION}; upgrade superlora-diffusers."
        )
    if version < 1:
        raise SuperLoRAFileError(f"{source} has an invalid format_version {version}; save it again.")
    if "base_fingerprint" in metadata and metadata["base_fingerprint"] != fingerprint(targets):
        raise SuperLoRAFileError(f"{source}: the target list does not match its fingerprint; the header was edited or damaged.")
    factors = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    try:
        kernels = header_kernels(targets, metadata)
    except (ValueError, TypeError, IndexError) as e:
        raise SuperLoRAFileError(f"{source} has malformed target_kernels ({e}); the file is damaged: "
                                 "save it again.") from None
    expected = parameter_shapes(config, [s for _, s in targets], kernels)
    missing = sorted(set(expected) - set(factors))
    unexpected = sorted(set(state_dict) - {PREFIX + k for k in expected})
    if missing or unexpected:
        raise SuperLoRAFileError(
            f"{source} does not match its own config: missing factors {missing[:3]}, unexpected keys {unexpected[:3]}; "
            "the file is damaged: save it again."
        )
    for name, shape in expected.items():
        if tuple(factors[name].shape) != tuple(shape):
            raise SuperLoRAFileError(
                f"{source}: factor {name} has shape {tuple(factors[name].shape)}, its config implies {tuple(shape)}; "
                "the file is damaged: save it again."
            )
    return SuperLoRAFile(config, targets, factors, metadata)


def resolve_weight_file(path: str | os.PathLike, weight_name: str | None = None) -> Path:
    """A file, a folder holding `weight_name` (default `superlora_weights.safetensors`), or a Hub repo id."""
    path_str = os.fspath(path)
    local = Path(path_str)
    if local.is_dir():
        return local / (weight_name or WEIGHT_NAME)
    looks_like_repo = path_str.count("/") == 1 and not path_str.startswith((".", "/", "~")) and local.suffix == ""
    if local.exists() or not looks_like_repo:
        return local
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path_str, weight_name or WEIGHT_NAME))
    except Exception as e:  # noqa: BLE001 (offline, missing repo, no access: one message for all)
        raise SuperLoRAFileError(
            f"{path_str!r} is neither a local file or folder nor a reachable Hub repo ({type(e).__name__}); check the path."
        ) from None
