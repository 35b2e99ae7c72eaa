"""Distil the shipped toy model (sdfast/data/models/tiny) into ``tiny-lcm``, a latent consistency
model (Luo et al. 2023, "Latent Consistency Models") that draws the prompt in 1-4 steps.

The student is the teacher's U-Net plus diffusers' guidance-scale embedding (``time_cond_proj_dim``,
its ``cond_proj`` layer zero-initialised, so the student starts as the teacher); the text encoder,
tokenizer and VAE are the teacher's. Each training step, for toy latents x0, a solver step index n
and a guidance w ~ U[w_min, w_max]:

- x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε at t = t_n (a grid of ``--solver-steps`` DDIM timesteps, k = 1000 / that apart);
- the guided teacher takes one DDIM step t_n → t_{n-1} with guidance 1 + w (its own cond/uncond rows:
  x0 = x0_c + w (x0_c − x0_u), and likewise ε);
- the student's consistency function f(x, t, w) = c_skip(t) x + c_out(t) x0_pred(x, t, w) at (x_t, t_n)
  is pulled (pseudo-Huber loss) towards the EMA target network's f at (x_{t-1}, t_{n-1}).
c_skip, c_out are LCM's boundary conditions with σ_data = 0.5 and timestep scaling 10, the values
diffusers' LCMScheduler uses at sampling time, so sdfast's ``lcm`` scheduler samples the result.

Usage (one thread):
    OMP_NUM_THREADS=1 python scripts/distill_lcm.py --work /tmp/lcm --out sdfast/data/models/tiny-lcm

The defaults are the shipped run; the model folder's TRAINING.md records its time and accuracy.
Checkpoints go to --work every --save-every steps; --resume continues from the last one.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdfast import toy  # noqa: E402
from sdfast.fsio import staging_dir  # noqa: E402
from sdfast.loop import guidance_embedding  # noqa: E402
from sdfast.model.folder import LCM_SCHEDULER_CONFIG  # noqa: E402

TEACHER = ROOT / "sdfast" / "data" / "models" / "tiny"
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, default=TEACHER, help="teacher model folder (default: the toy model)")
    p.add_argument("--work", type=Path, required=True, help="folder for the dataset cache, checkpoints and log")
    p.add_argument("--out", type=Path, required=True, help="where to write the distilled model folder")
    p.add_argument("--steps", type=int, default=3500, help="training steps (default 3500)")
    p.add_argument("--batch", type=int, default=32, help="latents per step (default 32)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--ema", type=float, default=0.95, help="target network EMA decay (default 0.95, LCM's)")
    p.add_argument("--solver-steps", type=int, default=50, help="DDIM grid of the teacher's solver (default 50)")
    p.add_argument("--w-min", type=float, default=2.0, help="least guidance w (teacher scale 1 + w; default 2)")
    p.add_argument("--w-max", type=float, default=8.0, help="largest guidance w (default 8)")
    p.add_argument("--embed-dim", type=int, default=32, help="guidance embedding width (default 32)")
    p.add_argument("--huber-c", type=float, default=0.001, help="pseudo-Huber constant (default 0.001)")
    p.add_argument("--n-images", type=int, default=8192, help="toy images encoded for training (default 8192)")
    p.add_argument("--seed", type=int, default=1234, help="data and training seed (default 1234)")
    p.add_argument("--save-every", type=int, default=250, help="checkpoint every N steps (default 250)")
    p.add_argument("--resume", action="store_true", help="continue from --work/ckpt.pt")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def log(args, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(args.work / "log.txt", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip(t), c_out(t) (diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete)."""
    s = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def alphas_cumprod(cfg: dict) -> torch.Tensor:
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"],
                           dtype=torch.float64) ** 2  # scaled_linear
    return torch.cumprod(1 - betas, 0).float()


def dataset(args, tokenizer, text_encoder, vae, scale: float):
    """(latents (N, C, h, w), caption embeddings (N, S, D), the empty prompt's (1, S, D)), cached in --work."""
    cache = args.work / "data.pt"
    if cache.is_file():
        return torch.load(cache)
    images, captions, _ = toy.sample_dataset(args.n_images, seed=args.seed, size=64)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)]) * scale

        def embed(texts):
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            return torch.cat([text_encoder(ids[i:i + 512])[0] for i in range(0, len(ids), 512)])

        unique = sorted(set(captions))
        table = embed(unique)
        index = torch.tensor([unique.index(c) for c in captions])
        uncond = embed([""])
    data = {"latents": lat, "captions": table, "caption_index": index, "uncond": uncond}
    torch.save(data, cache)
    return data


def x0_from_eps(x, eps, a):
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    t0, c0 = time.perf_counter(), time.process_time()
    tokenizer = CLIPTokenizer.from_pretrained(args.teacher / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.teacher / "text_encoder", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(args.teacher / "vae", torch_dtype=torch.float32).eval()
    teacher = UNet2DConditionModel.from_pretrained(args.teacher / "unet", torch_dtype=torch.float32).eval().requires_grad_(False)
    scale = float(vae.config.scaling_factor)
    sched_cfg = json.loads((args.teacher / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    ac = alphas_cumprod(sched_cfg)
    data = dataset(args, tokenizer, text_encoder, vae, scale)
    log(args, f"data: {tuple(data['latents'].shape)} latents, {len(data['captions'])} captions")

    cfg = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    cfg["time_cond_proj_dim"] = args.embed_dim
    student = UNet2DConditionModel(**cfg)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in m for m in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # starts as the teacher
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    start = 0
    ckpt = args.work / "ckpt.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt)
        student.load_state_dict(state["student"])
        target.load_state_dict(state["target"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(args, f"resumed at step {start}")

    k = sched_cfg["num_train_timesteps"] // args.solver_steps
    grid = torch.arange(1, args.solver_steps + 1) * k - 1  # 19, 39, ..., 999
    gen = torch.Generator().manual_seed(args.seed + start)
    n = len(data["latents"])
    student.train()
    running = None
    for step in range(start, args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x0 = data["latents"][idx]
        cond = data["captions"][data["caption_index"][idx]]
        uncond = data["uncond"].expand_as(cond)
        t = grid[torch.randint(0, args.solver_steps, (args.batch,), generator=gen)]
        t_prev = (t - k).clamp(min=0)
        w = args.w_min + (args.w_max - args.w_min) * torch.rand(args.batch, generator=gen)
        w_emb = guidance_embedding(w + 1.0, args.embed_dim)  # the embedding of w = g - 1, as sampled
        noise = torch.randn(x0.shape, generator=gen)
        a_t = ac[t].view(-1, 1, 1, 1)
        a_prev = torch.where(t - k >= 0, ac[t_prev], ac[0]).view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

        eps = student(x_t, t, cond, timestep_cond=w_emb).sample
        cs, co = boundary(t)
        pred = cs * x_t + co * x0_from_eps(x_t, eps, a_t)
        with torch.no_grad():
            both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).sample
            eu, ec = both.chunk(2)
            wv = w.view(-1, 1, 1, 1)
            x0_c, x0_u = x0_from_eps(x_t, ec, a_t), x0_from_eps(x_t, eu, a_t)
            x0_g = x0_c + wv * (x0_c - x0_u)
            eps_g = ec + wv * (ec - eu)
            x_prev = a_prev.sqrt() * x0_g + (1 - a_prev).sqrt() * eps_g  # DDIM step t -> t - k
            eps_tgt = target(x_prev, t_prev, cond, timestep_cond=w_emb).sample
            cs_p, co_p = boundary(t_prev)
            goal = cs_p * x_prev + co_p * x0_from_eps(x_prev, eps_tgt, a_prev)
        loss = (torch.sqrt((pred - goal) ** 2 + args.huber_c**2) - args.huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters(), strict=True):
                pt.mul_(args.ema).add_(ps.detach(), alpha=1 - args.ema)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            log(args, f"step {step + 1}/{args.steps} loss {running:.5f} "
                      f"wall {time.perf_counter() - t0:.0f}s cpu {time.process_time() - c0:.0f}s")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"student": student.state_dict(), "target": target.state_dict(),
                        "opt": opt.state_dict(), "step": step + 1}, tmp)
            tmp.replace(ckpt)
            write_model(args, target, step + 1, time.perf_counter() - t0, time.process_time() - c0)


def write_model(args, unet, steps: int, wall: float, cpu: float) -> None:
    """The distilled folder at --out, written whole or not at all: the target (EMA) network, as in LCM."""
    with staging_dir(args.out, complete="model_index.json") as tmp:
        for part in ("text_encoder", "tokenizer", "vae"):
            shutil.copytree(args.teacher / part, tmp / part)
        # stored in fp16 like the teacher's weights (sdfast loads them at the precision asked for)
        copy.deepcopy(unet).half().save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(LCM_SCHEDULER_CONFIG, indent=2))
        index = json.loads((args.teacher / "model_index.json").read_text(encoding="utf-8"))
        index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"])
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        cmd = " ".join(["python scripts/distill_lcm.py", *sys.argv[1:]])
        (tmp / "TRAINING.md").write_text(
            "Latent consistency distillation of the toy model (sdfast/data/models/tiny) by "
            "scripts/distill_lcm.py.\n\n"
            f"Command: {cmd}\n\nSteps: {steps}, wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min "
            f"({torch.get_num_threads()} thread(s)).\n", encoding="utf-8")


if __name__ == "__main__":
    main()
