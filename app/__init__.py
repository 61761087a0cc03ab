"""SuperLoRA studio: a Gradio app to generate with, compare, sweep and train SuperLoRA adapters.

Start it with `python -m app` (or `superlora-app`); `python -m app --help` lists the options. The logic
lives in `app.core` (testable without a browser), the layout in `app.ui`.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
