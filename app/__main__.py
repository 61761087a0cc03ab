"""`python -m app [--base PATH] [--adapters DIR] [--host 127.0.0.1] [--port 7860]`: start the SuperLoRA studio."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description="SuperLoRA studio: generate, compare, sweep and "
                                "train SuperLoRA adapters in the browser.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="toy",
                   help="base model: 'toy' (the embedded default) or a local diffusers Stable Diffusion folder")
    p.add_argument("--adapters", default="out",
                   help="folder of trained adapters (searched recursively; new trainings are written here)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--device", default=None, help="cpu or cuda (None: cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .core import Studio
    from .ui import launch

    try:
        studio = Studio(args.base, args.adapters, device=args.device)
    except (OSError, ValueError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: cannot load base model {args.base!r}: {text}", file=sys.stderr)
        return 2
    print(f"SuperLoRA studio: base {studio.base_path}, adapters in {studio.adapters_dir}", flush=True)
    launch(studio, host=args.host, port=args.port, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
