"""Score a personalised pipeline with the frozen judge of the embedded toy world.

Three questions, each on its own prompts and fixed seeds:
- subject: does "a photo of sks <class>" show the subject? (judge subject accuracy and fidelity; for any subject,
  bundled or given by its images, the calibrated fidelity of toy/fidelity.py: 0 the plain class, 1 the subject)
- recontext: does "a photo of sks <class> on a <bg> background" follow the prompt? (background accuracy)
- prior: does "a photo of a <class>" still show a plain <class>? (shape accuracy, subject rate)
"""

from __future__ import annotations

import torch

from .toy import fidelity, judge, world


def generate_images(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 8):
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return images


def evaluate_subject(pipe, subject: str | None = None, n: int = 16, seed: int = 0, steps: int = 25,
                     guidance: float = 5.0, token: str = "sks", reference_images=None,
                     class_name: str | None = None) -> dict[str, float]:
    """Judge scores of `pipe` (with or without an adapter loaded) for a bundled `subject` of the toy world, or for
    any subject given by its `reference_images` (PIL list or folder) and `class_name`."""
    shape = world.SUBJECTS[subject].shape if subject else class_name
    backgrounds = [world.BACKGROUND_NAMES[i % len(world.BACKGROUND_NAMES)] for i in range(n)]
    subject_images = generate_images(pipe, [f"a photo of {token} {shape}"] * n, seed, steps, guidance)
    recontext = generate_images(pipe, [f"a photo of {token} {shape} on a {bg} background" for bg in backgrounds],
                                seed + 1000, steps, guidance)
    prior = generate_images(pipe, [f"a photo of a {shape}"] * n, seed + 2000, steps, guidance)
    return judge_scores(subject_images, recontext, backgrounds, prior, subject, reference_images=reference_images,
                        class_name=class_name, vae=pipe.vae)


def judge_scores(subject_images, recontext, backgrounds: list[str], prior, subject: str | None = None,
                 value_range: tuple[float, float] = (-1, 1), reference_images=None, class_name: str | None = None,
                 vae=None) -> dict[str, float]:
    """The three questions' judge scores from already generated images (PIL, or tensors in `value_range`).

    A bundled `subject` gets the judge's subject head (subject_acc, subject_fidelity, recontext_subject_acc,
    prior_not_subject). Every subject, bundled or given by `reference_images` (PIL list or folder; the bundled
    subject's held-out renders by default) and `class_name`, gets the subject-agnostic scores of toy/fidelity.py:
    subject_fidelity_cal (0: the plain class, 1: the subject's references after the VAE round trip), its raw
    value (subject_fidelity_nn) and ends (subject_fidelity_floor, _ceiling), subject_match / recontext_subject_match
    (share of images nearer the references than the plain class), prior_not_subject_match, subject_shape_acc,
    recontext_background_acc and prior_shape_acc."""
    if subject is not None:
        class_name = world.SUBJECTS[subject].shape
        reference_images = world.reference_images(subject) if reference_images is None else reference_images
        scores = _subject_head_scores(subject_images, recontext, backgrounds, prior, subject, value_range)
    elif reference_images is None or class_name is None:
        raise ValueError("judge_scores needs a bundled subject, or reference_images and class_name for any other")
    else:
        scores = {"recontext_background_acc": judge.score(recontext, background=backgrounds,
                                                          value_range=value_range)["background_acc"],
                  "prior_shape_acc": judge.score(prior, shape=class_name, value_range=value_range)["shape_acc"]}
    fid = {name: fidelity.calibrated_fidelity(images, reference_images, class_name, vae, value_range)
           for name, images in (("subject", subject_images), ("recontext", recontext), ("prior", prior))}
    shape_acc = judge.score(subject_images, shape=class_name, value_range=value_range)["shape_acc"]
    return {**scores, "subject_shape_acc": shape_acc, "subject_fidelity_cal": fid["subject"]["calibrated"],
            "subject_fidelity_nn": fid["subject"]["fidelity"], "subject_fidelity_floor": fid["subject"]["floor"],
            "subject_fidelity_ceiling": fid["subject"]["ceiling"], "subject_match": fid["subject"]["subject_match"],
            "recontext_subject_match": fid["recontext"]["subject_match"],
            "prior_not_subject_match": 1.0 - fid["prior"]["subject_match"]}


def _subject_head_scores(subject_images, recontext, backgrounds, prior, subject: str, value_range) -> dict[str, float]:
    """The bundled subjects' scores (the judge's subject head and embedding), as the benchmark files hold them."""
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


NO_SUBJECT_HEAD = ("not available: the judge's subject head and embedding fidelity know only the bundled subjects; "
                   "scores are the subject-agnostic ones (subject_fidelity_cal, subject_match, ...)")


def _subject_from_args(args) -> tuple[str, list | None, dict]:
    """(class, reference images or None for a bundled subject, what the JSON says about the subject); bad input is
    one line naming the problem and the fix."""
    if args.subject:
        if args.class_name not in (None, world.SUBJECTS[args.subject].shape):
            raise SystemExit(f"error: --subject {args.subject} is a {world.SUBJECTS[args.subject].shape}; "
                             "drop --class_name")
        return world.SUBJECTS[args.subject].shape, None, {"subject": args.subject}
    if not args.class_name:
        raise SystemExit(f"error: --instance_dir needs --class_name, the subject's class ({', '.join(world.SHAPES)})")
    try:
        images = fidelity.load_instance_images(args.instance_dir, "--instance_dir")
        fidelity.reference_tensor(images, args.class_name)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return args.class_name, images, {"instance_dir": str(args.instance_dir), "class_name": args.class_name,
                                     "subject_head": NO_SUBJECT_HEAD}


def main(argv: list[str] | None = None) -> None:
    """`python -m superlora_diffusers.evaluate OUT_DIR --subject NAME` (a bundled subject) or `... OUT_DIR
    --instance_dir DIR --class_name CLASS` (any subject, from its images): base vs adapter, judged."""
    import argparse
    import json
    from pathlib import Path

    import superlora_diffusers  # noqa: F401  (attaches the pipeline verbs)

    from .toy import load_toy_pipeline
    from .training.validation import image_grid

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("adapter_dir")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--subject", choices=world.SUBJECT_NAMES, help="a bundled subject of the toy world")
    who.add_argument("--instance_dir", help="any subject: a folder of its instance images (with --class_name)")
    parser.add_argument("--class_name", help=f"the subject's class, with --instance_dir: {', '.join(world.SHAPES)}")
    parser.add_argument("--base", default="toy")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    shape, references, about = _subject_from_args(args)
    pipe = load_toy_pipeline(name_or_path=args.base)
    run = dict(n=args.n, steps=args.steps, reference_images=references, class_name=shape)
    before = evaluate_subject(pipe, args.subject, **run)
    rows = {"compare.png": (f"a photo of sks {shape}", 0), "compare_prior.png": (f"a photo of a {shape}", 2000)}
    base_rows = {name: generate_images(pipe, [prompt] * 8, seed, args.steps, 5.0) for name, (prompt, seed) in rows.items()}
    pipe.load_superlora_weights(args.adapter_dir)
    after = evaluate_subject(pipe, args.subject, **run)
    for name, (prompt, seed) in rows.items():  # the first 8 seeds the judge scored, base above adapter
        adapter_row = generate_images(pipe, [prompt] * 8, seed, args.steps, 5.0)
        image_grid(base_rows[name] + adapter_row, cols=8).resize((8 * 96, 2 * 96), 0).save(Path(args.adapter_dir) / name)
    print(f"judge scores, {args.n} images per prompt, {args.steps} steps (base model -> with adapter):")
    if "subject_head" in about:
        print(f"  subject head {about['subject_head']}")
    for key in before:
        print(f"  {key:26s} {before[key]:.2f} -> {after[key]:.2f}")
    info = pipe.get_superlora_info()  # which adapter these figures belong to, in the same file
    adapter = {"config": info["config"], "num_parameters": info["num_parameters"],
               "adapted_layers": len(info["targets"]), "lora_rank1_parameters": info["lora_rank1_parameters"],
               "file_bytes": info["file_bytes"]}
    scores = {**about, "adapter_info": adapter, "base": before, "adapter": after}
    (Path(args.adapter_dir) / "judge_scores.json").write_text(json.dumps(scores, indent=1))
    print(f"same seeds, base (top) vs adapter (bottom): {Path(args.adapter_dir) / 'compare.png'} (subject), "
          f"{Path(args.adapter_dir) / 'compare_prior.png'} (class prompt)")


if __name__ == "__main__":
    main()
