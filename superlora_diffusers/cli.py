"""The `superlora` command: inspect, export, merge, generate with, and train SuperLoRA adapters.

Every sub-command checks its input before doing work; a user error prints one line `error: ...` on stderr
and exits with code 2 (no traceback). Nothing that exists is overwritten unless `--force` is given.
The work itself lives in `export.py` (and the `training` package for `train`); this file only parses and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  superlora inspect out/sks-star
  superlora export out/sks-star --to lora --rank 16        # diffusers: pipe.load_lora_weights("out/sks-star")
  superlora export out/sks-star --to kohya --energy 0.99   # A1111 / ComfyUI / Civitai LoRA
  superlora export out/sks-star --to diff                  # exact full ΔW (.diff keys)
  superlora merge out/sks-star --base toy --out out/sks-star-merged
  superlora generate --adapter out/sks-star --prompt "a photo of sks star" --out out/images
  superlora train --instance_data_dir examples/striped_star --instance_prompt "a photo of sks star" --output_dir out/sks-star

FILE is an adapter .safetensors file or a folder holding superlora_weights.safetensors.
Run `superlora <command> --help` for the options of one command."""


class UsageError(Exception):
    """Bad command-line input found after parsing."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: ...`, exit 2) like every other error here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _energy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1] (e.g. 0.99), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="superlora",
        description="SuperLoRA adapters for diffusers: inspect them, export them to LoRA tools, merge them into a "
                    "base model, generate images, train.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"superlora-diffusers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="print an adapter's config, targets, parameter count, size, base fingerprint",
                       description="Print what an adapter file holds: its config, the layers it adapts, the trainable "
                                   "parameter count against a rank-1 LoRA, the file size and the fingerprint of the "
                                   "base model it was trained on.")
    p.add_argument("file", metavar="FILE", help="adapter .safetensors file or a folder holding one")
    p.add_argument("--targets", action="store_true", help="also list every adapted layer with its shape")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--base", metavar="PATH", help="also check that the adapter fits this base model ('toy', a "
                                                  "diffusers folder or a Hub id)")

    p = sub.add_parser("export", help="export to a plain LoRA (diffusers or kohya keys, by SVD) or exact .diff",
                       description="Export an adapter for tools that only know LoRA. 'lora' and 'kohya' keep a "
                                   "truncated SVD of each layer's ΔW (at --rank R, or the smallest rank keeping "
                                   "--energy E of Σσ²) and report the relative error per layer and overall; "
                                   "'diff' writes the exact full ΔW under .diff keys (A1111, ComfyUI; large).",
                       epilog="formats:\n"
                              "  lora   diffusers/peft keys: pipe.load_lora_weights(PATH); default PATH is\n"
                              "         pytorch_lora_weights.safetensors beside the adapter\n"
                              "  kohya  lora_unet_*/lora_te_* .lora_down/.lora_up/.alpha keys (A1111, ComfyUI,\n"
                              "         Civitai; diffusers loads them too)\n"
                              "  diff   lora_unet_*.diff: the full ΔW of every layer, exact",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="adapter .safetensors file or a folder holding one")
    p.add_argument("--to", required=True, choices=("lora", "kohya", "diff"), help="output format (see below)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rank", type=_positive_int, metavar="R", help="LoRA rank of every layer (capped at the "
                                                                          "layer's full rank)")
    size.add_argument("--energy", type=_energy, metavar="E", help="per-layer rank: the smallest keeping this "
                                                                   "fraction of Σσ² (e.g. 0.99)")
    p.add_argument("--out", metavar="PATH", help="output .safetensors file, or an existing folder (default: beside "
                                                  "the adapter)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the written tensors (default float32; float16 halves the size)")
    p.add_argument("--report", metavar="JSON", help="also write the per-layer error report to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="print the error of every layer")
    p.add_argument("--force", action="store_true", help="replace an existing output file")

    p = sub.add_parser("merge", help="write a full diffusers model folder with the adapter fused in",
                       description="Fuse an adapter into its base model (W + scale·ΔW) and save the whole pipeline "
                                   "with save_pretrained: the folder loads with plain diffusers, no SuperLoRA needed.")
    p.add_argument("file", metavar="FILE", help="adapter .safetensors file or a folder holding one")
    p.add_argument("--base", required=True, metavar="PATH", help="base model: 'toy', a diffusers folder or a Hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist, unless --force)")
    p.add_argument("--scale", type=float, default=1.0, help="strength of the fused adapter (default 1.0)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="dtype of the saved weights (default auto: the dtype the base is stored in)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")

    p = sub.add_parser("generate", help="generate PNG images with a base model and (optionally) an adapter",
                       description="Generate images with a base model and an adapter and write them as PNGs.")
    p.add_argument("--base", default="toy", metavar="PATH", help="base model: 'toy' (default, the embedded model), "
                                                                 "a diffusers folder or a Hub id")
    p.add_argument("--adapter", metavar="FILE", help="adapter file or folder (leave out for the base model alone)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default=None, help="negative prompt")
    p.add_argument("--num-images", type=_positive_int, default=4, metavar="N", help="images to write (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default 0)")
    p.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength (default 1.0)")
    p.add_argument("--height", type=_positive_int, default=None, help="image height (default: the model's)")
    p.add_argument("--width", type=_positive_int, default=None, help="image width (default: the model's)")
    p.add_argument("--out", default="superlora_images", metavar="DIR", help="output folder (default superlora_images)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--force", action="store_true", help="replace existing images of the same names")

    sub.add_parser("train", add_help=False, help="train a DreamBooth adapter (all arguments go to the trainer; "
                                                 "`superlora train --help` lists them)")
    return parser


# ---- the commands --------------------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    from .export import adapter_info, check_base
    from .superlora import versus_lora1

    info = adapter_info(args.file)
    if args.base:
        info["fits_base"] = check_base(args.file, args.base)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    config = info["config"]
    shown = {k: v for k, v in config.items() if k != "version"}
    lines = [
        f"file:             {info['path']} ({info['bytes']:,} bytes)",
        f"format:           superlora v{info['format_version']} (written by superlora-diffusers {info['library_version']})",
        f"factorization:    {_describe(config)}",
        f"config:           {json.dumps(shown)}",
        f"parameters:       {info['num_parameters']:,} trainable "
        f"(a rank-1 LoRA of the same layers: {info['lora_rank1_parameters']:,}, "
        f"{versus_lora1(info['num_parameters'], info['lora_rank1_parameters'])})",
        f"targets:          {info['num_targets']} layers ("
        + ", ".join(f"{c}: {n}" for c, n in info["targets_per_component"].items())
        + f"), {info['adapted_entries']:,} adapted weight entries",
        f"base fingerprint: {info['base_fingerprint']}",
    ]
    for key, value in sorted(info["metadata"].items()):
        lines.append(f"{key + ':':<17} {value}")
    if args.base:
        lines.append(f"fits base:        yes ({info['fits_base']})")
    if args.targets:
        lines.append("layers:")
        lines += [f"  {name}  {o}x{i}" for name, o, i in info["targets"]]
    print("\n".join(lines))
    return 0


def _describe(config: dict) -> str:
    parts = [config["factorization"], f"rank={config['rank']}", f"groups={config['groups']}", f"fold={config['fold']}"]
    if config.get("alpha") is not None:
        parts.append(f"alpha={config['alpha']}")
    if config["factorization"] == "kronecker":
        parts.append(f"kron_splits={config['kron_splits']}")
    if config.get("shuffle"):
        parts.append("shuffle")
    if config.get("projection", "none") != "none":
        parts.append(f"{config['projection']} projection ρ={config['projection_ratio']}")
    return " ".join(parts)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_adapter

    if args.to == "diff" and (args.rank is not None or args.energy is not None):
        raise UsageError("--to diff is exact (the full ΔW): it takes no --rank or --energy.")
    if args.to != "diff" and args.rank is None and args.energy is None:
        raise UsageError(f"--to {args.to} needs --rank R or --energy E (e.g. --rank 16 or --energy 0.99).")
    report_path = Path(args.report) if args.report else None
    if report_path is not None and report_path.exists() and not args.force:
        raise UsageError(f"{str(report_path)!r} already exists; pass --force to replace it.")
    report = export_adapter(args.file, args.out, args.to, args.rank, args.energy, args.dtype, overwrite=args.force)
    low, high = report.ranks
    print(f"wrote {report.path} ({report.bytes:,} bytes, {report.num_values:,} values, {len(report.layers)} layers)")
    if args.to == "diff":
        if report.overall_error == 0:
            print("exact: the full ΔW of every layer, bit for bit")
        else:
            print(f"full ΔW of every layer; {args.dtype} rounding costs a relative error of {report.overall_error:.2e}")
    else:
        rank = f"rank {low}" if low == high else f"ranks {low}-{high}"
        print(f"{rank}; relative error ‖ΔW − up·down‖/‖ΔW‖: overall {report.overall_error:.4f}, "
              f"worst layer {report.max_error:.4f}")
        layers = report.layers if args.verbose else sorted(report.layers, key=lambda e: -e.relative_error)[:5]
        print("per-layer errors:" if args.verbose else "worst layers (all with -v):")
        for e in layers:
            print(f"  {e.relative_error:.4f}  rank {e.rank:<4} {e.name}")
    if args.to == "lora":
        print(f"load it with: pipe.load_lora_weights({str(report.path.parent)!r}, weight_name={report.path.name!r})")
    if report_path is not None:
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report.to_dict(), indent=1))
        print(f"wrote {report_path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .export import merge_adapter

    out = merge_adapter(args.file, args.base, args.out, scale=args.scale, dtype=args.dtype, overwrite=args.force)
    print(f"wrote {out}: a diffusers pipeline with the adapter fused in (scale {args.scale}); load it with "
          f"DiffusionPipeline.from_pretrained({str(out)!r})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .export import load_adapter, load_base_pipeline, load_into

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder.")
    names = [f"image_{args.seed + i:04d}.png" for i in range(args.num_images)]
    existing = [n for n in names if (out / n).exists()]
    if existing and not args.force:
        raise UsageError(f"{str(out / existing[0])!r} already exists; pass --force to replace it or choose another --out.")
    adapter = load_adapter(args.adapter) if args.adapter else None  # check the adapter before loading the base
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"unknown --device {args.device!r} (e.g. cpu, cuda, cuda:1, mps).") from None
    pipe = load_base_pipeline(args.base)
    if adapter is not None:
        load_into(pipe, args.adapter, adapter)
    try:
        pipe.to(device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"cannot use device {args.device!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    kwargs = {}
    if args.adapter and args.scale != 1.0:
        kwargs["cross_attention_kwargs"] = {"scale": args.scale}
    generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_images)]
    images = pipe([args.prompt] * args.num_images, negative_prompt=[args.negative_prompt] * args.num_images
                  if args.negative_prompt else None, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=args.height, width=args.width, generator=generators, **kwargs).images
    out.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images):
        image.save(out / name)
    print(f"wrote {len(images)} images to {out}/ ({names[0]}" + (f" ... {names[-1]})" if len(names) > 1 else ")"))
    return 0


COMMANDS = {"inspect": cmd_inspect, "export": cmd_export, "merge": cmd_merge, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # everything after `train` belongs to the trainer, --help included
        from .training import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from .export import ExportError
    from .serialization import SuperLoRAFileError

    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ExportError, SuperLoRAFileError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # bad input that surfaced deeper (a base that does not fit, disk full)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """No per-component progress bars from diffusers/transformers: the command prints its own summary."""
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.split()) if text else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
