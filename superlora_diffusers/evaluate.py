"""Score a personalised pipeline with the frozen judge of the embedded toy world.

Three questions, each on its own prompts and fixed seeds:
- subject: does "a photo of sks <class>" show the subject? (judge subject accuracy and fidelity)
- recontext: does "a photo of sks <class> on a <bg> background" follow the prompt? (background accuracy)
- prior: does "a photo of a <class>" still show a plain <class>? (shape accuracy, subject rate)
"""

from __future__ import annotations

import torch

from .toy import judge, world


def generate_images(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 8):
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return images


def evaluate_subject(pipe, subject: str, n: int = 16, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                     token: str = "sks") -> dict[str, float]:
    """Judge scores of `pipe` (with or without an adapter loaded) for one subject of the toy world."""
    shape = world.SUBJECTS[subject].shape
    backgrounds = [world.BACKGROUND_NAMES[i % len(world.BACKGROUND_NAMES)] for i in range(n)]
    subject_images = generate_images(pipe, [f"a photo of {token} {shape}"] * n, seed, steps, guidance)
    recontext = generate_images(pipe, [f"a photo of {token} {shape} on a {bg} background" for bg in backgrounds],
                                seed + 1000, steps, guidance)
    prior = generate_images(pipe, [f"a photo of a {shape}"] * n, seed + 2000, steps, guidance)
    return judge_scores(subject_images, recontext, backgrounds, prior, subject)


def judge_scores(subject_images, recontext, backgrounds: list[str], prior, subject: str,
                 value_range: tuple[float, float] = (-1, 1)) -> dict[str, float]:
    """The three questions' judge scores from already generated images (PIL, or tensors in `value_range`)."""
    shape = world.SUBJECTS[subject].shape
    s = judge.score(subject_images, subject=subject, value_range=value_range)
    r = judge.score(recontext, background=backgrounds, subject=subject, value_range=value_range)
    p = judge.score(prior, shape=shape, subject="none", value_range=value_range)
    return {
        "subject_acc": s["subject_acc"],
        "subject_fidelity": s["subject_fidelity"],
        "recontext_background_acc": r["background_acc"],
        "recontext_subject_acc": r["subject_acc"],
        "prior_shape_acc": p["shape_acc"],
        "prior_not_subject": p["subject_acc"],
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m superlora_diffusers.evaluate OUT_DIR --subject NAME`: base vs adapter, judged."""
    import argparse
    import json
    from pathlib import Path

    import superlora_diffusers  # noqa: F401  (attaches the pipeline verbs)

    from .toy import load_toy_pipeline
    from .training import image_grid

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("adapter_dir")
    parser.add_argument("--subject", required=True, choices=world.SUBJECT_NAMES)
    parser.add_argument("--base", default="toy")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    pipe = load_toy_pipeline(name_or_path=args.base)
    before = evaluate_subject(pipe, args.subject, n=args.n, steps=args.steps)
    shape = world.SUBJECTS[args.subject].shape
    rows = {"compare.png": (f"a photo of sks {shape}", 0), "compare_prior.png": (f"a photo of a {shape}", 2000)}
    base_rows = {name: generate_images(pipe, [prompt] * 8, seed, args.steps, 5.0) for name, (prompt, seed) in rows.items()}
    pipe.load_superlora_weights(args.adapter_dir)
    after = evaluate_subject(pipe, args.subject, n=args.n, steps=args.steps)
    for name, (prompt, seed) in rows.items():  # the first 8 seeds the judge scored, base above adapter
        adapter_row = generate_images(pipe, [prompt] * 8, seed, args.steps, 5.0)
        image_grid(base_rows[name] + adapter_row, cols=8).resize((8 * 96, 2 * 96), 0).save(Path(args.adapter_dir) / name)
    print(f"judge scores, {args.n} images per prompt, {args.steps} steps (base model -> with adapter):")
    for key in before:
        print(f"  {key:26s} {before[key]:.2f} -> {after[key]:.2f}")
    (Path(args.adapter_dir) / "judge_scores.json").write_text(json.dumps({"base": before, "adapter": after}, indent=1))
    print(f"same seeds, base (top) vs adapter (bottom): {Path(args.adapter_dir) / 'compare.png'} (subject), "
          f"{Path(args.adapter_dir) / 'compare_prior.png'} (class prompt)")


if __name__ == "__main__":
    main()
