"""Train a LoRA that teaches sdfast's toy model (``sdfast/data/models/tiny``) a colour it never saw.

The toy world (:mod:`sdfast.toy`) has six colours; the shipped tokenizer also has single tokens for
"orange", "purple", "cyan" and more (scripts/make_tokenizer.py's built-in corpus), whose embeddings
the toy training never moved. This script teaches the model one of them (``--concept``: orange, the
shipped file, or cyan, probed and graded lower), as a shape colour and as a background, with a PEFT
LoRA on the text encoder and the U-Net (the VAE has no LoRA and stays as shipped), mixed with
ordinary toy scenes so the six old colours are kept. Stages:

  data     scenes in the new colour drawn by toy.render with it added to the palette (every shape,
           the new colour on each old colour and each old colour on it), and ordinary toy scenes
           (toy.sample_dataset). The VAE never saw the new colour: its encoder maps an orange shape
           to a latent that decodes yellow-green or red (centre 176,210,40 on red), and a cyan one
           to blue or green, so these scenes' latents are found by inverting the frozen decoder
           instead (Adam on the latent from the encoder's posterior mean, MSE to the image); the old
           scenes use the posterior means as scripts/train_toy.py does. Cached in --work. Scenes
           whose inverted latent still decodes to other colours (classify reads them wrong) are
           left out.
  lora     PEFT LoraConfig + add_adapter on the text encoder (q/k/v/out_proj, fc1, fc2) and the
           U-Net (attention, feed-forward and proj_in/out: --unet-targets); the base weights are
           frozen. Epsilon-prediction loss with the base training's conditioning schedule (caption
           dropout 0.12 by default, a random caption always below t = 250, ramping to none at
           t = 600), a random caption template per sample. --guided-loss adds the loss of the
           classifier-free-guided prediction (the empty caption's branch held fixed), so that
           sampling at that guidance lands on the data: the shipped file needed it (TRAINING.md).
  export   get_peft_model_state_dict + StableDiffusionPipeline.save_lora_weights with the adapters'
           LoraConfig as lora_adapter_metadata (PEFT's lora_A/lora_B keys: export() says why not
           convert_state_dict_to_diffusers as diffusers' example), fp32 safetensors, atomically.
           Text-encoder keys carry the ``text_model.`` prefix LoRA files use (transformers 5
           flattened CLIPTextModel). The file's ``sdfast_toy_lora`` metadata names the colour and
           its RGB.

Everything is seeded from --seed and runs on --threads CPU threads (default 1). The shipped file's
command is in sdfast/data/loras/TRAINING.md. Grade with scripts/eval_toy_lora.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdfast import toy  # noqa: E402

SIZE = 64
#: colours the LoRA can teach: single tokens of the shipped tokenizer that the toy training never
#: used, at an RGB the frozen VAE decoder can draw (the inversion reaches it). Nearest palette colour:
#: orange 93 RGB units (yellow), cyan 140 (blue). purple (200, 40, 200) and pink (250, 140, 190) are
#: tokens too, but 50 inversion steps leave 100 % and 78 % of their scenes decoding other colours.
CONCEPTS: dict[str, tuple[int, int, int]] = {"orange": (245, 130, 20), "cyan": (30, 200, 220)}
DEFAULT_CONCEPT = "orange"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def new_combos() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with the new colour (NEW) as the colour or the background: 36, fixed order."""
    return ([(s, NEW, b) for s in toy.SHAPES for b in toy.COLOURS]
            + [(s, c, NEW) for s in toy.SHAPES for c in toy.COLOURS])


def render(shape: str, colour: str, background: str, size: int = SIZE,
           rng: np.random.Generator | None = None) -> np.ndarray:
    """toy.render's drawing (same geometry and random draws) with the new colour in the palette."""
    return np.asarray(toy.render(shape, colour, background, size, rng if rng is not None else np.random.default_rng(),
                                 palette=PALETTE))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def log(args, msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    with open(args.work / "train.log", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------------------------
# data


def refine(vae, z: torch.Tensor, x: torch.Tensor, steps: int, lr: float, noise: float = 0.0,
           seed: int = 0) -> torch.Tensor:
    """``steps`` Adam steps (cosine lr from ``lr`` to lr/10) on the latents ``z`` (unscaled) toward
    vae.decode(z) ~ x. With ``noise`` > 0 the loss adds the MSE of decode(z + noise * e), e a fresh
    Gaussian draw each step (seeded): the latent is pulled into the middle of the region that decodes
    to x, not just to a point of it, so that the sampler's error around it still decodes right."""
    gen = torch.Generator().manual_seed(seed)
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for k in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps)))
        loss = F.mse_loss(vae.decode(z).sample, x)
        if noise > 0:
            loss = loss + F.mse_loss(vae.decode(z + noise * torch.randn(z.shape, generator=gen)).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return z.detach()


def invert(vae, x: torch.Tensor, steps: int, lr: float, noise: float = 0.0, chunk: int = 96) -> torch.Tensor:
    """Latents z (unscaled) with vae.decode(z) ~ x: refine() from the encoder's posterior mean."""
    out = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        with torch.no_grad():
            z = vae.encode(xb).latent_dist.mean
        out.append(refine(vae, z, xb, steps, lr, noise, seed=i))
    return torch.cat(out)


def stage_data(args, vae):
    path = args.work / "data.pt"
    key = {k: getattr(args, k) for k in ("concept", "seed", "n_old", "per_combo", "invert_steps", "invert_lr")}
    if args.invert_noise > 0:  # older caches (no such flag) keep their key
        key["invert_noise"] = args.invert_noise
    if path.exists():
        ck = torch.load(path, weights_only=False)
        if ck["key"] == key:
            log(args, f"data: cached in {path}")
            return ck
    t0 = time.time()
    for p in vae.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(args.seed * 1000 + 7)
    labels_new = [c for c in new_combos() for _ in range(args.per_combo)]
    x_new = to_tensor(np.stack([render(*c, rng=rng) for c in labels_new]))
    z_new = invert(vae, x_new, args.invert_steps, args.invert_lr, args.invert_noise)
    with torch.no_grad():
        rec = vae.decode(z_new).sample.clamp(-1, 1)
    mse = F.mse_loss(rec, x_new).item()
    imgs = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    ok = np.mean([classify(im) == (c, b) for im, (_s, c, b) in zip(imgs, labels_new, strict=True)])
    log(args, f"data: {len(labels_new)} {NEW} scenes inverted ({args.invert_steps} steps): recon mse {mse:.4f}, "
              f"decoded classified right {ok:.1%} ({(time.time() - t0) / 60:.1f} min)")
    images, _captions, labels_old = toy.sample_dataset(args.n_old, seed=args.seed + 1, size=SIZE)
    x_old = to_tensor(images)
    with torch.no_grad():
        z_old = torch.cat([vae.encode(x_old[i : i + 256]).latent_dist.mean for i in range(0, len(x_old), 256)])
    ck = {"key": key, "z_new": z_new, "labels_new": labels_new, "z_old": z_old, "labels_old": labels_old,
          "recon_mse_new": mse, "decoded_ok_new": float(ok)}
    atomic_torch_save(ck, path)
    log(args, f"data: {args.n_old} toy scenes encoded; stage {(time.time() - t0) / 60:.1f} min")
    return ck


def decoded_right(vae, z: torch.Tensor, labels) -> list[bool]:
    """Whether each latent's decoded image classifies (new colour added) as its label's (colour, background)."""
    with torch.no_grad():
        dec = torch.cat([vae.decode(z[i : i + 64]).sample for i in range(0, len(z), 64)])
    imgs = ((dec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [classify(im) == (c, b) for im, (_s, c, b) in zip(imgs, labels, strict=True)]


def basin(vae, z: torch.Tensor, labels, sigma: float, seed: int = 0) -> float:
    """Share of the latents ``z`` (each decoding right) whose decode still classifies right with
    Gaussian noise of std ``sigma`` (unscaled units) added: how wide the region around them is that
    the decoder draws in the prompted colours; the sampler lands near, not on, what it learned."""
    gen = torch.Generator().manual_seed(seed)
    return float(np.mean(decoded_right(vae, z + sigma * torch.randn(z.shape, generator=gen), labels)))


def stage_retry(args, vae, data):
    """A second inversion pass, --invert-retry-steps more Adam steps (fresh optimiser, same cosine lr),
    on only the new colour's scenes whose first-pass latent still decodes to other colours (for
    orange, mostly orange next to red). Cached in --work/data-retry.pt beside the first pass's
    data.pt, so the first pass is reused; the scenes still wrong after it are dropped as before."""
    if args.invert_retry_steps <= 0:
        return data
    path = args.work / "data-retry.pt"
    key = {**data["key"], "invert_retry_steps": args.invert_retry_steps}
    if path.exists():
        ck = torch.load(path, weights_only=False)
        if ck["key"] == key:
            log(args, f"data: retry pass cached in {path} ({ck['fixed']} of {ck['tried']} scenes fixed)")
            return {**data, "z_new": ck["z_new"]}
    t0 = time.time()
    for p in vae.parameters():
        p.requires_grad_(False)
    wrong = [i for i, ok in enumerate(decoded_right(vae, data["z_new"], data["labels_new"])) if not ok]
    z_new = data["z_new"].clone()
    fixed = 0
    if wrong:
        rng = np.random.default_rng(args.seed * 1000 + 7)  # stage_data's draws, replayed: the same images
        x_all = to_tensor(np.stack([render(*c, rng=rng) for c in data["labels_new"]]))
        x = x_all[wrong]
        z = refine(vae, z_new[wrong], x, args.invert_retry_steps, args.invert_lr, args.invert_noise, seed=1)
        ok = decoded_right(vae, z, [data["labels_new"][i] for i in wrong])
        fixed = sum(ok)
        z_new[wrong] = z
    atomic_torch_save({"key": key, "z_new": z_new, "tried": len(wrong), "fixed": fixed}, path)
    log(args, f"data: retry pass ({args.invert_retry_steps} steps) on {len(wrong)} scenes decoded wrong: "
              f"{fixed} now right ({(time.time() - t0) / 60:.1f} min)")
    return {**data, "z_new": z_new}


def sample_weights(labels, hard: list[str], hard_weight: float) -> torch.Tensor:
    """Per-scene sampling weights of the kept scenes in the new colour: every combo (shape, colour, background)
    drawn equally often however many of its scenes were kept (the dropped ones cluster next to red),
    and the combos whose "colour/background" is in ``hard`` ``hard_weight`` times as often."""
    counts: dict[tuple[str, str, str], int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    w = [(hard_weight if f"{c}/{b}" in hard else 1.0) / counts[(s, c, b)] for s, c, b in labels]
    return torch.tensor(w, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# grading helper (shared with scripts/eval_toy_lora.py)


def set_concept(name: str) -> None:
    """Make ``name`` (a key of CONCEPTS) the colour this module's data, classifier and export use."""
    global NEW, NEW_RGB, PALETTE, _EXT, _EXT_NAMES
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; expected one of {tuple(CONCEPTS)}")
    NEW, NEW_RGB = name, CONCEPTS[name]
    PALETTE = {**toy.PALETTE, NEW: NEW_RGB}
    _EXT = np.array(list(PALETTE.values()), dtype=np.float32)
    _EXT_NAMES = tuple(PALETTE)


set_concept(DEFAULT_CONCEPT)  # NEW, NEW_RGB, PALETTE and the classifier's palette


def _dominant(pixels: np.ndarray) -> str:
    px = pixels.reshape(-1, 3).astype(np.float32)
    idx = np.argmin(((px[:, None, :] - _EXT[None]) ** 2).sum(axis=2), axis=1)
    counts = np.bincount(idx, minlength=len(_EXT_NAMES))
    return _EXT_NAMES[int(np.argmax(counts))]  # ties: the first, as toy.classify


def classify(image) -> tuple[str, str]:
    """toy.classify's (centre colour, corner colour) with the new colour added to the palette."""
    from PIL import Image

    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    h, w = arr.shape[:2]
    ph, pw = max(1, h // 8), max(1, w // 8)
    top, left = (h - ph) // 2, (w - pw) // 2
    centre = arr[top : top + ph, left : left + pw]
    ch, cw = max(1, h // 10), max(1, w // 10)
    corners = np.concatenate([arr[:ch, :cw].reshape(-1, 3), arr[:ch, w - cw :].reshape(-1, 3),
                              arr[h - ch :, :cw].reshape(-1, 3), arr[h - ch :, w - cw :].reshape(-1, 3)])
    return _dominant(centre), _dominant(corners)


# ----------------------------------------------------------------------------------------------
# training


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def caption_ids(tokenizer, labels) -> torch.Tensor:
    """[N, templates, L] token ids of every template's caption of every label."""
    texts = [t.format(shape=s, colour=c, background=b) for s, c, b in labels for t in toy.TEMPLATES]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.view(len(labels), len(toy.TEMPLATES), -1)


def stage_lora(args, tokenizer, text, unet, data, scale: float):
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model

    for p in [*text.parameters(), *unet.parameters()]:
        p.requires_grad_(False)
    torch.manual_seed(args.seed)  # PEFT's gaussian init of lora_A draws from the global generator
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights="gaussian",
                                target_modules=args.unet_targets))
    # transformers 5's CLIPTextModel.add_adapter wants peft >= 0.22; PEFT's own injection is the same
    text_cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights="gaussian",
                          target_modules=TEXT_TARGETS)
    inject_adapter_in_model(text_cfg, text)
    text.peft_config = {"default": text_cfg}
    params = [p for p in [*text.parameters(), *unet.parameters()] if p.requires_grad]
    log(args, f"lora: rank {args.rank} alpha {args.alpha}, {sum(p.numel() for p in params)} trainable params")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed * 1000 + 3)

    z_new, z_old = data["z_new"] * scale, data["z_old"] * scale
    ids_new, ids_old = caption_ids(tokenizer, data["labels_new"]), caption_ids(tokenizer, data["labels_old"])
    z_all, ids_all = torch.cat([z_new, z_old]), torch.cat([ids_new, ids_old])
    n_templates = ids_all.shape[1]
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids[0]
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    alphas_cumprod = sched.alphas_cumprod.float()
    b = args.batch
    b_new = round(b * args.new_frac)
    w_new = None
    if args.balance_combos:
        w_new = sample_weights(data["labels_new"], args.hard, args.hard_weight)
        hard_share = float(w_new[[f"{c}/{bg}" in args.hard for _s, c, bg in data["labels_new"]]].sum() / w_new.sum())
        log(args, f"lora: {NEW} scenes drawn combo-balanced, {args.hard} x{args.hard_weight:g} "
                  f"({hard_share:.0%} of the {NEW} draws)")
    text.train()
    unet.train()
    t0 = time.time()
    ema_loss = None
    # an exponential moving average of the LoRA weights (warm-up decay min(d, (1 + k) / (10 + k))), what
    # is exported when --ema > 0
    ema = [p.detach().clone() for p in params] if args.ema > 0 else None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 100)
        if w_new is None:  # uniform over the kept scenes in the new colour
            i_new = torch.randint(0, len(z_new), (b_new,), generator=gen)
        else:
            i_new = torch.multinomial(w_new, b_new, replacement=True, generator=gen)
        i_old = len(z_new) + torch.randint(0, len(z_old), (b - b_new,), generator=gen)
        idx = torch.cat([i_new, i_old])
        z0 = z_all[idx]
        tok = ids_all[idx, torch.randint(0, n_templates, (b,), generator=gen)].clone()
        drop = torch.rand(b, generator=gen) < args.cond_drop
        tok[drop] = empty
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (b,), generator=gen)
        # the base model's schedule: random caption below R, probability (T - t) / (T - R) up to T
        r_, t_ = args.text_free_ramp_from, args.text_free_below
        late = (t < t_) & (torch.rand(b, generator=gen) < 1 - (t - r_) / (t_ - r_)) & ~drop
        n_late = int(late.sum())
        tok[late] = ids_all[torch.randint(0, len(ids_all), (n_late,), generator=gen),
                            torch.randint(0, n_templates, (n_late,), generator=gen)]
        ac = alphas_cumprod[t].view(b, 1, 1, 1)
        zt = ac.sqrt() * z0 + (1 - ac).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=text(tok)[0]).sample
        loss = F.mse_loss(pred, noise)
        if args.guided_loss > 0:
            # the new colour's scenes (--guided-on all: every scene) that kept their own caption: the
            # classifier-free-guided prediction at --guided-scale (the empty caption's beside it) asked
            # to match the noise too. The empty caption's prediction is held fixed (no gradient): it is
            # every prompt's guidance baseline, and training it here cost the old captions 6.7 points
            # (run G in TRAINING.md, commit edcf95e)
            which = (torch.arange(b) < b_new) if args.guided_on == "new" else torch.ones(b, dtype=torch.bool)
            g_idx = torch.nonzero(which & ~drop & ~late).flatten()
            if len(g_idx):
                with torch.no_grad():
                    u = unet(zt[g_idx], t[g_idx],
                             encoder_hidden_states=text(empty.expand(len(g_idx), -1))[0]).sample
                lo, hi = args.guided_scale[0], args.guided_scale[-1]
                # (one scale draws nothing: the generator's stream, and so the run, stays as with a fixed scale)
                gs = (lo + (hi - lo) * torch.rand(len(g_idx), generator=gen)).view(-1, 1, 1, 1) if hi > lo else lo
                guided = u + gs * (pred[g_idx] - u)
                loss = loss + args.guided_loss * (((guided - noise[g_idx]) / gs) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            log(args, f"lora step {step + 1}: loss {ema_loss:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                      f"({(time.time() - t0) / 60:.1f} min, {(time.time() - t0) / (step + 1):.3f} s/it)")
    minutes = (time.time() - t0) / 60
    log(args, f"lora: finished {args.steps} steps in {minutes:.1f} min, loss {ema_loss:.4f}")
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema, strict=True):
                p.copy_(e)
        log(args, f"lora: weights set to their EMA (decay {args.ema:g})")
    return text.eval(), unet.eval(), ema_loss, minutes


def export(args, text, unet) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    # diffusers' example converts with convert_state_dict_to_diffusers, which (diffusers 0.42, peft 0.21)
    # renames only the attention layers (to_q.lora.down ...) and leaves the rest PEFT's (proj_in.lora_A
    # ...); diffusers' load_lora_weights then skips the renamed ones without a word. PEFT's own keys
    # (lora_A / lora_B everywhere) are read whole by load_lora_weights and by sdfast.
    unet_layers = get_peft_model_state_dict(unet)
    text_layers = get_peft_model_state_dict(text)
    text_layers = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in text_layers.items()}
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True,
            weight_name=out.name, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=text.peft_config["default"].to_dict())
        written = Path(tmp) / out.name
        # contiguous fp32 tensors, and a note of what the file is in its metadata
        from safetensors import safe_open

        with safe_open(str(written), "pt") as fh:
            meta = dict(fh.metadata() or {})
        meta["sdfast_toy_lora"] = json.dumps({"concept": NEW, "rgb": NEW_RGB, "base": "sdfast tiny",
                                              "command": "python scripts/train_toy_lora.py " + " ".join(sys.argv[1:])})
        tensors = {k: v.float().contiguous() for k, v in load_file(str(written)).items()}
        final = Path(tmp) / "final.safetensors"
        save_file(tensors, str(final), metadata=meta)
        os.chmod(final, 0o644)
        os.replace(final, out)
    log(args, f"export: wrote {out} ({out.stat().st_size / 1e3:.1f} kB, {len(tensors)} tensors)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "sdfast" / "data" / "models" / "tiny",
                    help="the base model folder (the shipped toy model)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/toy-lora"), help="data cache and log")
    ap.add_argument("--concept", choices=tuple(CONCEPTS), default=DEFAULT_CONCEPT,
                    help="the colour to teach (see CONCEPTS)")
    ap.add_argument("--out", type=Path, help="the LoRA file (default sdfast/data/loras/toy-<concept>.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-combo", type=int, default=6, help="scenes per combo of the new colour (36 combos)")
    ap.add_argument("--invert-steps", type=int, default=50, help="Adam steps of the decoder inversion")
    ap.add_argument("--invert-lr", type=float, default=0.12)
    ap.add_argument("--invert-noise", type=float, default=0.0,
                    help="latent noise (unscaled units; the latents' std is about 2) under which the inversion "
                         "also asks the decoded image to match: latents deeper in the new colour's region "
                         "(0: plain MSE)")
    ap.add_argument("--invert-retry-steps", type=int, default=0,
                    help="more Adam steps for the new colour's scenes the first inversion pass left decoding wrong "
                         "(0: none, they are dropped)")
    ap.add_argument("--n-old", type=int, default=4096, help="ordinary toy scenes mixed in")
    ap.add_argument("--new-frac", type=float, default=0.5, help="share of each batch in the new colour")
    ap.add_argument("--balance-combos", action="store_true",
                    help="draw the new colour's scenes combo-balanced (see --hard) instead of uniformly over the kept scenes")
    ap.add_argument("--hard", nargs="*", default=[],
                    help='with --balance-combos: combos of the new colour drawn --hard-weight times as often, as "colour/background"')
    ap.add_argument("--hard-weight", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.0,
                    help="export an exponential moving average of the LoRA weights with this decay (0: the last step's)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--unet-targets", nargs="+", default=UNET_TARGETS, help="U-Net module names given a LoRA")
    ap.add_argument("--cond-drop", type=float, default=0.12)
    ap.add_argument("--guided-loss", type=float, default=0.0,
                    help="weight of a second loss on the new colour's scenes (--guided-on): the guided prediction "
                         "u + s (c - u) (u: the empty caption's, held fixed; s: --guided-scale) against the noise, "
                         "divided by s^2 (0: off)")
    ap.add_argument("--guided-scale", type=float, nargs="+", default=[7.5], metavar="S",
                    help="the guidance scale of --guided-loss; two values: drawn uniformly between them per sample")
    ap.add_argument("--guided-on", choices=["new", "all"], default="new",
                    help="--guided-loss on the new colour's scenes only, or on the old ones too")
    ap.add_argument("--text-free-below", type=int, default=600)
    ap.add_argument("--text-free-ramp-from", type=int, default=250)
    ap.add_argument("--stop-after", choices=["data"], help="stop after this stage")
    args = ap.parse_args()
    set_concept(args.concept)
    if args.out is None:
        args.out = ROOT / "sdfast" / "data" / "loras" / f"toy-{args.concept}.safetensors"
    if not 0 <= args.text_free_ramp_from < args.text_free_below:
        ap.error("--text-free-ramp-from must be >= 0 and below --text-free-below")
    combo_names = {f"{c}/{b}" for _s, c, b in new_combos()}
    if bad := [h for h in args.hard if h not in combo_names]:
        ap.error(f"--hard {bad}: not combos of the new colour (colour/background, one of them {NEW})")
    if len(args.guided_scale) > 2 or not 1 <= args.guided_scale[0] <= args.guided_scale[-1]:
        ap.error("--guided-scale: one scale, or a range LO HI, with 1 <= LO <= HI")
    if (args.hard or args.hard_weight != 1.0) and not args.balance_combos:
        ap.error("--hard and --hard-weight need --balance-combos")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    log(args, f"start: {' '.join(sys.argv[1:])}")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(args.model / "vae").float().eval()
    scale = float(vae.config.scaling_factor)
    data = stage_data(args, vae)
    data = stage_retry(args, vae, data)
    if args.stop_after == "data":
        return
    # an inverted latent the decoder still draws in other colours would teach the wrong colour: keep
    # the new colour's scenes whose decoded latent toy.classify's patches (new colour added) read as their label
    keep = [i for i, ok in enumerate(decoded_right(vae, data["z_new"], data["labels_new"])) if ok]
    n_all = len(data["labels_new"])
    dropped = sorted({data["labels_new"][i] for i in range(n_all) if i not in set(keep)})
    log(args, f"data: kept {len(keep)} of {n_all} {NEW} scenes (dropped some of {dropped})")
    data = {**data, "z_new": data["z_new"][keep], "labels_new": [data["labels_new"][i] for i in keep]}
    log(args, "data: kept latents still decoded right under latent noise "
              + ", ".join(f"{sg:g}: {basin(vae, data['z_new'], data['labels_new'], sg):.1%}" for sg in (1.0, 1.5)))
    tokenizer = CLIPTokenizer.from_pretrained(args.model / "tokenizer")
    if tokenizer.tokenize(NEW) != [f"{NEW}</w>"]:
        raise SystemExit(f"the tokenizer of {args.model} does not have {NEW!r} as one token")
    text = CLIPTextModel.from_pretrained(args.model / "text_encoder").float()
    unet = UNet2DConditionModel.from_pretrained(args.model / "unet").float()
    text, unet, _loss, _minutes = stage_lora(args, tokenizer, text, unet, data, scale)
    export(args, text, unet)


if __name__ == "__main__":
    main()
