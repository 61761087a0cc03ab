"""Does the shipped trainer compute what `quality.py`'s own loop computes? (issue 23)

One job (peft LoRA r=1, striped_star, seed 0, conv targets + CLIP, prior weight 1, lr 3e-3) is trained twice:
by `quality.run_job` (the own loop), and by `train(TrainingConfig)` with its batch maker replaced by one that
replays the own loop's random draws (instance and class picks, latent noise, diffusion noise, timesteps, in the
own loop's order) and its seed set right before the adapter is built, as the own loop does. Both are then
scored by the benchmark's judge. Equal figures mean the two loops differ only in how they draw batches
(the trainer: epoch permutations and per-step generators, as diffusers' scripts do), i.e. by seed noise.

    python benchmarks/quality.py run --work_dir out/quality ...   # once: prepares out/quality (images, data.pt)
    python benchmarks/loop_agreement.py --work_dir out/quality --steps 1500 --json out/loop-agreement.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import quality as Q

JOB = dict(method="lora_r1", subject="striped_star", seed=0, lr=3e-3, phase="final", n_eval=16, eval_steps=20,
           prior_weight=1.0, targets="conv", text=True)
SCORES = ("subject_acc", "subject_fidelity", "subject_fidelity_cal", "prior_shape_acc", "recontext_background_acc")


def own_draws(job: dict, steps: int) -> dict[str, torch.Tensor]:
    """Every random number of `run_job`, drawn exactly as it draws them."""
    data = Q.W["data"][job["subject"]]
    inst, prior, b = data["inst"], data["prior"], Q.BATCH
    g = torch.Generator("cpu").manual_seed(job["seed"])
    latent = tuple(inst.shape[2:])
    return dict(ii=torch.randint(0, inst.shape[0], (steps, b), generator=g),
                pi=torch.randint(0, prior.shape[0], (steps, b), generator=g),
                eps=torch.randn((steps, 2 * b) + latent, generator=g), noise=torch.randn((steps, 2 * b) + latent, generator=g),
                t=torch.randint(0, Q.W["noise"].config.num_train_timesteps, (steps, 2 * b), generator=g))


def trainer_with_own_draws(job: dict, steps: int, out_dir: Path) -> dict:
    import superlora_diffusers.training.setup as setup
    import superlora_diffusers.training.trainer as trainer
    from superlora_diffusers.training.step import Batch

    d, b = own_draws(job, steps), Q.BATCH

    def make_batch(run, rows, micro):
        stats = torch.cat([run.inst_stats[:, 0][d["ii"][micro]], run.class_stats[:, 0][d["pi"][micro]]])
        latents = (stats[:, 0] + stats[:, 1] * d["eps"][micro]) * run.vae.config.scaling_factor
        noisy = run.noise_scheduler.add_noise(latents, d["noise"][micro], d["t"][micro])
        prompts = [run.instance.prompts[0]] * b + [run.classes.prompts[0]] * b
        return Batch(latents, d["noise"][micro], d["t"][micro], noisy, prompts, b)

    build = setup.build_adapter

    def seeded_build(*args, **kwargs):
        torch.manual_seed(job["seed"])  # run_job seeds right before injecting
        return build(*args, **kwargs)

    trainer.make_batch, setup.build_adapter = make_batch, seeded_build
    cfg = dataclasses.replace(Q.training_config(dict(job, loop="trainer"), Path(Q.W["work_dir"])),
                              output_dir=str(out_dir))
    weights = trainer.train(cfg)
    unet, te = copy.deepcopy(Q.W["unet"]), copy.deepcopy(Q.W["te"])
    Q.make_pipeline(unet, te).load_lora_weights(str(weights.parent))
    return Q.evaluate(unet, te, job["subject"], job["n_eval"], job["eval_steps"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", required=True, help="a quality.py work dir (prepared images and data.pt)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    Q.init_worker("cpu", args.work_dir, 1)
    job = dict(JOB, steps=args.steps)
    t0 = time.time()
    own = Q.run_job(dict(job))
    t1 = time.time()
    trained = trainer_with_own_draws(job, args.steps, Path(args.work_dir) / "runs" / "loop-agreement")
    out = {"job": job, "own_loop": own, "trainer_with_own_draws": trained,
           "seconds": {"own_loop": round(t1 - t0), "trainer": round(time.time() - t1)}}
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    for k in SCORES:
        print(f"{k:28s} own loop {own[k]:.4f}   trainer (own draws) {trained[k]:.4f}")


if __name__ == "__main__":
    main()
