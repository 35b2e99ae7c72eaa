"""Mutation check: put small deliberate bugs into a copy of the code and see whether the tests notice.

Each mutation below is one text substitution in one file: a bug that matters (the guidance
combine, a scheduler's coefficients, the seed's draw order, the manifest's hashes, the shape
profile's bounds, the attention choice, ...). For each, the script applies it to a temporary copy
of this checkout (never to the checkout itself), runs the tests that should catch it there and
prints whether they did:

    killed    the tests failed: the bug is caught
    survived  the tests passed with the bug in: a hole in the suite (exit 1)
    stale     the target text is not in the file (or not exactly once): the code moved on and the
              mutation must be updated, so it cannot rot silently (exit 1)
    error     pytest did not run the tests (collection error, none selected, timeout) (exit 1)

    python scripts/mutate.py                 # every mutation, one pytest process at a time
    python scripts/mutate.py --list          # names, targets and tests
    python scripts/mutate.py --check         # only: is every target still in the code? (seconds)
    python scripts/mutate.py lms-order seed  # some of them

Before the mutations, the union of their tests runs once on the unmutated copy (skip it with
``--no-baseline``): a test that already fails would count every mutation as killed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: node ids or files (one -k at most: pytest keeps the last)
    bug: str  # what it stands for


PARITY = "tests/test_pipeline_parity.py"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation("guidance-halves-swapped", "sdfast/loop.py",
             "    uncond, cond = eps.chunk(2)\n", "    cond, uncond = eps.chunk(2)\n",
             (f"{PARITY}::test_txt2img_matches_diffusers_for_every_scheduler[euler]",
              "bench/test_micro.py::test_guidance_combine", "bench/test_micro.py::test_guided_step_without_unet"),
             "guidance reads the [uncond, cond] U-Net halves the wrong way round"),
    Mutation("guidance-halves-swapped-micro", "sdfast/loop.py",
             "    uncond, cond = eps.chunk(2)\n", "    cond, uncond = eps.chunk(2)\n",
             ("bench/test_micro.py::test_guidance_combine",),
             "the same bug, caught by the micro-benchmark alone (it timed a combine of its own before)"),
    Mutation("guidance-combine", "sdfast/loop.py",
             "return uncond + guidance * (cond - uncond)", "return cond + guidance * (cond - uncond)",
             (f"{PARITY}::test_txt2img_matches_diffusers_for_every_scheduler[euler]",),
             "u + g(t - u) written as t + g(t - u)"),
    Mutation("guidance-threshold", "sdfast/request.py",
             "return self.guidance_scale > 1.0", "return self.guidance_scale >= 1.0",
             (f"{PARITY}::test_guidance_one_equals_cond_only_and_differs_from_guided",
              f"{PARITY}::test_txt2img_variants_match_diffusers[guidance-1]"),
             "guidance 1 runs the doubled U-Net batch (diffusers runs guidance only for g > 1)"),
    Mutation("text-halves-swapped", "sdfast/text.py",
             "texts = negatives + prompts if guided else prompts",
             "texts = prompts + negatives if guided else prompts",
             (f"{PARITY}::test_txt2img_variants_match_diffusers[negative-prompt]",
              f"{PARITY}::test_txt2img_variants_match_diffusers[batch-of-two]"),
             "the text embeddings are [cond, uncond] while the combine expects [uncond, cond]"),
    Mutation("lms-order", "sdfast/schedulers/lms.py",
             "ORDER = 4\n", "ORDER = 3\n",
             ("tests/test_schedulers.py", "-k", "lms"),
             "LMS of order 3 instead of diffusers' 4"),
    Mutation("lms-coefficients", "sdfast/schedulers/lms.py",
             "        o = min(i + 1, order)\n", "        o = min(i + 2, order)\n",
             ("tests/test_schedulers.py", "-k", "lms"),
             "LMS warm-up uses one node too many (wrong coefficients in the first steps)"),
    Mutation("lms-history-order", "sdfast/schedulers/lms.py",
             "for k in range(ORDER - 1, 0, -1):", "for k in range(1, ORDER):",
             ("tests/test_schedulers.py", "-k", "lms"),
             "LMS slope history shifted front to back (every old slope becomes the newest)"),
    Mutation("seed", "sdfast/runtime.py",
             'generator = torch.Generator("cpu").manual_seed(req.seed)',
             'generator = torch.Generator("cpu").manual_seed(req.seed + 1)',
             (f"{PARITY}::test_txt2img_matches_diffusers_for_every_scheduler[euler]",),
             "the seed's generator is not the one diffusers seeds"),
    Mutation("init-noise-sigma", "sdfast/runtime.py",
             "latents = latents * sched.init_noise_sigma", "latents = latents",
             (f"{PARITY}::test_txt2img_matches_diffusers_for_every_scheduler[lms]",),
             "initial latents not scaled by the scheduler's init_noise_sigma"),
    Mutation("ancestral-noise-for-skipped-steps", "sdfast/runtime.py",
             "for i in range(first, len(sched.timesteps)):", "for i in range(len(sched.timesteps)):",
             (f"{PARITY}::test_img2img_matches_diffusers[euler_a]",),
             "img2img draws ancestral noise for the steps it skips, shifting every later draw"),
    Mutation("img2img-noise-before-posterior", "sdfast/runtime.py",
             '            with timer("vae_encode"):\n'
             "                init = self.encode_image(req.image, req.height, req.width, generator).expand(shape)\n"
             "            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)\n",
             "            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)\n"
             '            with timer("vae_encode"):\n'
             "                init = self.encode_image(req.image, req.height, req.width, generator).expand(shape)\n",
             (f"{PARITY}::test_img2img_matches_diffusers[ddim]",),
             "img2img draws the forward noise before the VAE posterior sample (diffusers' order is the reverse)"),
    Mutation("img2img-noise-level", "sdfast/runtime.py",
             "latents = sched.add_noise(init, noise, first)", "latents = sched.add_noise(init, noise, 0)",
             (f"{PARITY}::test_img2img_matches_diffusers[ddim]",),
             "img2img noises the init image to the first step's level, not the start step's"),
    Mutation("img2img-posterior-mean", "sdfast/runtime.py",
             "return (mean + std * eps) * self.info.scaling_factor", "return mean * self.info.scaling_factor",
             (f"{PARITY}::test_img2img_matches_diffusers[ddim]",),
             "img2img takes the VAE posterior mean instead of sampling it with the seed"),
    Mutation("vae-scaling", "sdfast/runtime.py",
             "z = latents / self.info.scaling_factor", "z = latents * self.info.scaling_factor",
             (f"{PARITY}::test_txt2img_matches_diffusers_for_every_scheduler[euler]",),
             "latents multiplied instead of divided by the VAE scaling factor before decoding"),
    Mutation("manifest-hash-default-off", "sdfast/artifacts.py",
             "check_hashes: bool = True", "check_hashes: bool = False",
             ("tests/test_artifacts_tamper_weights.py", "-k", "flipped"),
             "loading checks sizes but not hashes by default"),
    Mutation("seal-skips-weight-data", "sdfast/artifacts.py",
             "if p.is_file() and p.name != MANIFEST}",
             'if p.is_file() and p.name != MANIFEST and not p.name.endswith(".onnx.data")}',
             ("tests/test_artifacts_tamper_weights.py",),
             "the manifest hashes graphs but not the *.onnx.data weight files"),
    Mutation("verify-skips-weight-data", "sdfast/artifacts.py",
             "    for rel, rec in m.files.items():\n        p = inside(root, rel)",
             '    for rel, rec in m.files.items():\n        if rel.endswith(".onnx.data"):\n'
             "            continue\n        p = inside(root, rel)",
             ("tests/test_artifacts_tamper_weights.py",),
             "loading verifies graphs but skips the *.onnx.data weight files"),
    Mutation("profile-min-ignored", "sdfast/model/components.py",
             "if not lo <= v <= hi:", "if not v <= hi:",
             ("tests/test_profile_bounds.py",),
             "the profile check ignores the minimum batch and sides of an export"),
    Mutation("attention-math-keeps-sdpa", "sdfast/engines/torch.py",
             'AttnProcessor2_0() if attention == "sdpa" else AttnProcessor()', "AttnProcessor2_0()",
             ("tests/test_attention.py",),
             "attention='math' keeps PyTorch SDPA"),
    Mutation("ort-unet-output-off", "sdfast/engines/onnxruntime.py",
             "            self.session.run_with_iobinding(binding)\n"
             "            return {k: v.float() for k, v in outs.items()}\n",
             "            self.session.run_with_iobinding(binding)\n"
             '            return {k: v.float() * (1.001 if k == "noise_pred" else 1) for k, v in outs.items()}\n',
             (f"{PARITY}::test_onnxruntime_pipeline_matches_eager_latents_and_pixels[euler]",),
             "the ONNX Runtime U-Net is 0.1 % off: pixels barely move, latents do"),
    # -- long prompts, the graph runner in every family, artifact verification of every component

    Mutation("chunk-count-off-by-one", "sdfast/text.py",
             "k = chunks or max(1, *(-(-len(b) // (s - 2)) for b in bodies))",
             "k = chunks or max(1, *(len(b) // (s - 2) + 1 for b in bodies))",
             ("tests/test_long_prompt_chunks.py",),
             "a text of exactly 75 (150) tokens takes one chunk too many: an extra empty chunk"),
    Mutation("chunk-pad-with-eos", "sdfast/text.py",
             "bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id",
             "bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id",
             ("tests/test_long_prompt_chunks.py",),
             "chunks padded with <|endoftext|> whatever the tokenizer's pad token (SD 2.x / SDXL's second "
             "tokenizer pad with '!', id 0)"),
    Mutation("chunk-missing-chunks-all-pad", "sdfast/text.py",
             "            part = [bos, *body[j * (s - 2) : (j + 1) * (s - 2)], eos]\n",
             "            part = [bos, *body[j * (s - 2) : (j + 1) * (s - 2)], eos] if j == 0 or j * (s - 2) < len(body) "
             "else []\n",
             ("tests/test_long_prompt_chunks.py",),
             "a shorter text of a batch is padded to the longest with rows of pad ids only, not empty chunks "
             "(BOS, EOS, padding)"),
    Mutation("chunk-sdxl-second-tokenizer-cut", "sdfast/text.py",
             "k = max(i.shape[1] for i in ids)",
             "k = ids[0].shape[1]",
             ("tests/test_long_prompt_chunks.py",),
             "SDXL: the first tokenizer's chunk count wins, so a longer prompt_2 is silently cut to it"),
    Mutation("chunk-truncate-keeps-tail", "sdfast/text.py",
             "            body = body[: s - 2]\n",
             "            body = body[-(s - 2) :]\n",
             ("tests/test_long_prompt_chunks.py",),
             "long_prompt='truncate' keeps the last 75 tokens instead of the first (diffusers keeps the first)"),
    Mutation("graphs-load-copies-text-only", "sdfast/graphs.py",
             "        for k, v in run.cond.items():\n            s.cond[k].copy_(v)\n",
             "        for k, v in run.cond.items():\n            if k == \"encoder_hidden_states\":\n"
             "                s.cond[k].copy_(v)\n",
             ("tests/test_family_coverage.py",),
             "the graphed step refreshes only the text embeddings: SDXL's text_embeds/time_ids and LCM's "
             "timestep_cond stay those of the first request of a shape"),
    Mutation("graphs-step-key-ignores-text-length", "sdfast/graphs.py",
             "key = StepKey(b, h, w, run.guided, sched.name, tuple((k, tuple(v.shape)) for k, v in sorted(run.cond.items())))",
             "key = StepKey(b, h, w, run.guided, sched.name)",
             ("tests/test_family_coverage.py",),
             "one captured step per image shape whatever the prompt's chunk count: a long prompt reuses a "
             "one-chunk step's static text buffer"),
    Mutation("graphs-static-scheduler-epsilon", "sdfast/graphs.py",
             "self.sched = make_scheduler(key.scheduler, scheduler_config)",
             "self.sched = make_scheduler(key.scheduler, {**scheduler_config, \"prediction_type\": \"epsilon\"})",
             ("tests/test_family_coverage.py",),
             "the graph's static scheduler ignores the model's prediction type: SD 2.x v-prediction graphed "
             "as epsilon"),
    Mutation("graphs-engine-first-output-only", "sdfast/graphs.py",
             "return {k: v.clone() for k, v in g.outputs.items()}",
             "return {k: v.clone() for k, v in list(g.outputs.items())[:1]}",
             ("tests/test_family_coverage.py",),
             "a graphed engine copies out only its first output (SDXL's text_encoder_2 loses text_embeds)"),
    Mutation("graphs-engine-key-ignores-shape", "sdfast/graphs.py",
             "key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))",
             "key = tuple((k, v.dtype) for k, v in sorted(inputs.items()))",
             ("tests/test_family_coverage.py",),
             "a graphed engine keeps one graph per input names, not per shape: a new batch size reuses "
             "(broadcasts into) the first shape's buffers"),
    Mutation("verify-skips-last-component", "sdfast/artifacts.py",
             "    for c in info.specs:\n        for key in (\"file\", \"weights\"):",
             "    for c in list(info.specs)[:-1]:\n        for key in (\"file\", \"weights\"):",
             ("tests/test_family_coverage.py",),
             "verification never asks whether the family's last component (vae_encoder) has a hash"),
    Mutation("verify-unlisted-component-file-accepted", "sdfast/artifacts.py",
             "            if rel is not None and rel not in m.files:",
             "            if rel is not None and rel not in m.files and not (root / rel).is_file():",
             ("tests/test_family_coverage.py",),
             "a component file on disk that the manifest does not list (no hash) is loaded unchecked"),
    Mutation("verify-unsealed-weights-beside-graph-accepted", "sdfast/artifacts.py",
             "    _refuse_unsealed_component_files(m, root, hint)\n", "",
             ("tests/test_family_coverage.py",),
             "a weight file beside a component's graph (unet.onnx.data, unet.bin) that the manifest does not "
             "hash is loaded unchecked"),
    Mutation("verify-missing-listed-file-ignored", "sdfast/artifacts.py",
             "        if not p.is_file():\n"
             "            raise ArtifactMismatch(f\"engines: {root / rel} is listed in the manifest but missing; {hint}\")\n",
             "        if not p.is_file():\n            continue\n",
             ("tests/test_family_coverage.py",),
             "a file the manifest lists but the folder lacks passes verification"),
    Mutation("serve-key-strips-any-whitespace", "sdfast/serve/app.py",
             "hmac.compare_digest(token.strip(\" \\t\").encode(), key)",
             "hmac.compare_digest(token.strip().encode(), key)",
             ("tests/test_security_nearmiss.py", "-k", "non_ascii_space"),
             "the API key check strips every Unicode space, so the key with a no-break space appended passes"),
    Mutation("serve-body-limit-trusts-content-length", "sdfast/serve/app.py",
             "    async for chunk in request.stream():\n        size += len(chunk)\n        if size > limit:",
             "    async for chunk in request.stream():\n        size += len(chunk)\n        if size > limit and not length:",
             ("tests/test_security_nearmiss.py", "-k", "content_length_smaller or streamed or chunking"),
             "a body whose Content-Length header is under the limit is read whole however long it really is"),
    Mutation("fsio-stale-leftover-by-prefix", "sdfast/fsio.py",
             "    return name.startswith(stem) and len(os.fsencode(leftover)) >= _name_max(folder) - 4\n",
             "    return name.startswith(stem)\n",
             ("tests/test_fallbacks.py", "-k", "prefixes"),
             "a crashed swap of `eng` is cleaned up (or put back) as if it were a leftover of `engines`"),
    Mutation("model-folder-shard-suffix-kept", "sdfast/model/folder.py",
             '_SHARD.sub("", n.split(".")[-2])', 'n.split(".")[-2]',
             ("tests/test_fallbacks.py", "-k", "sharded"),
             "a sharded variant (model.fp16-00001-of-00002.safetensors) is named fp16-00001-of-00002, not fp16"),
    Mutation("strength-one-refused", "sdfast/rules.py",
             "if not is_number(value) or not 0 < value <= 1:", "if not is_number(value) or not 0 < value < 1:",
             ("tests/test_rule_bounds.py", "-k", "strength"),
             "img2img strength 1 (repaint all) is refused: the upper bound made exclusive"),
    Mutation("strength-checked-only-with-init-image", "sdfast/request.py",
             "        strength = rules.check_strength(strength)",
             "        strength = rules.check_strength(strength) if image is not None else strength",
             ("tests/test_rule_bounds.py", "-k", "without_an_init_image"),
             "a wrong strength passes silently when no init image is given"),
    Mutation("check-int-upper-bound-exclusive", "sdfast/rules.py",
             "if not is_int(value) or value < lo or (hi is not None and value > hi):",
             "if not is_int(value) or value < lo or (hi is not None and value >= hi):",
             ("tests/test_rule_bounds.py",),
             "every integer rule refuses its own maximum (64 images, 2**64-1 seed, the training schedule)"),
    Mutation("images-exif-orientation-ignored", "sdfast/images.py",
             "            return to_rgb(ImageOps.exif_transpose(im), arg)",
             "            return to_rgb(im, arg)",
             ("tests/test_fallbacks.py", "-k", "exif or upright"),
             "a phone photo's EXIF orientation is ignored: img2img starts from a sideways picture"),
    Mutation("loop-finite-check-nan-only", "sdfast/loop.py",
             "        ok = torch.isfinite(new).all()\n", "        ok = ~torch.isnan(new).any()\n",
             ("tests/test_fallbacks.py", "-k", "non_finite_latents"),
             "the after-loop check catches NaN latents but lets +inf and -inf through"),
    Mutation("vae-fallback-nan-only", "sdfast/safety.py",
             "        if bool(torch.isfinite(image).all()):  # a sync",
             "        if not bool(torch.isnan(image).any()):  # a sync",
             ("tests/test_fallbacks.py", "-k", "non_finite_pixels"),
             "an inf (fp16 overflow) decode is handed out as an image instead of being redone in fp32"),
    Mutation("run-batch-rows-of-the-first-request", "sdfast/runtime.py",
             "images=images[row : row + r.batch], latents=latents[row : row + r.batch],",
             "images=images[0 : r.batch], latents=latents[0 : r.batch],",
             ("tests/test_batch_rows_differ.py", "-k", "served"),
             "every request of a served batch is handed the first request's images"),
    Mutation("batch-keys-miss-long-prompt", "sdfast/runtime.py",
             '"start_step", "long_prompt", "guidance_cut",', '"start_step", "guidance_cut",',
             ("tests/test_batch_rows_differ.py", "-k", "long_prompt_policy"),
             "run_batch gives requests of mixed long-prompt policy the first one's policy"),
    Mutation("cache-branch-ignored", "sdfast/runtime.py",
             "for_pipeline(self, head.cache_interval, head.cache_branch)", "for_pipeline(self, head.cache_interval)",
             ("tests/test_request_approximations.py", "-k", "cache_branch"),
             "--cache-branch is accepted and recorded but DeepCache always skips at branch 0"),
    Mutation("scalar-not-unwrapped", "sdfast/rules.py",
             "    if getattr(value, \"ndim\", None) == 0 and callable(getattr(value, \"item\", None)):\n        return value.item()\n",
             "",
             ("tests/test_inputs_values.py", "-k", "scalars or numpy_seed or uint64"),
             "0-d numpy / torch values for seed, steps, guidance are refused (or kept as tensors) again"),
    Mutation("surrogate-unchecked", "sdfast/request.py",
             "        text.encode(\"utf-8\")\n", "        text.encode(\"utf-8\", \"surrogatepass\")\n",
             ("tests/test_inputs_values.py", "-k", "surrogate"),
             "a prompt with a lone surrogate reaches the tokenizer (a UnicodeEncodeError traceback)"),
    Mutation("group-divisibility-unchecked", "sdfast/model/folder.py",
             "        if any(d % groups for d in dims):", "        if False and any(d % groups for d in dims):",
             ("tests/test_inputs_values.py", "-k", "dims_a_layer"),
             "channels not a multiple of norm_num_groups load, and GroupNorm fails at the first call"),
    Mutation("beta-order-unchecked", "sdfast/schedulers/base.py",
             "if self.beta_start > self.beta_end:", "if self.beta_start > self.beta_end * 10:",
             ("tests/test_inputs_values.py", "-k", "noise_schedule or edges_of_each"),
             "beta_start above beta_end loads (a schedule whose noise falls with t)"),
    Mutation("steps-offset-bound", "sdfast/schedulers/base.py",
             "not 0 <= self.steps_offset < n:", "not 0 <= self.steps_offset <= n:",
             ("tests/test_inputs_values.py", "-k", "noise_schedule or edges_of_each"),
             "steps_offset = num_train_timesteps loads (every timestep past the schedule)"),
    Mutation("dpmpp-repeat-allowed", "sdfast/schedulers/dpmpp_2m.py",
             "        if repeats:\n", "        if False:\n",
             ("tests/test_schedulers.py", "-k", "most_steps_stay_finite"),
             "DPM++ at 1000 linspace steps repeats a sigma: a zero-size step, NaN latents"),
    Mutation("disk-full-errno-ignored", "sdfast/fsio.py",
             "if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:", "if False:",
             ("tests/test_disk_full.py",),
             "ENOSPC mid-export is a traceback again instead of one NoSpace line"),
    Mutation("nearly-full-bound", "sdfast/fsio.py",
             "return shutil.disk_usage(folder).free < _NEARLY_FULL", "return shutil.disk_usage(folder).free <= _NEARLY_FULL",
             ("tests/test_disk_full.py", "-k", "nearly_full"),
             "an opaque library error with exactly 1 MiB free is called the disk"),
    Mutation("lora-alpha-ignored", "sdfast/lora.py",
             "        alpha = rank if self.layer.alpha is None else self.layer.alpha\n", "        alpha = rank\n",
             ("tests/test_lora.py", "-k", "each_format"),
             "a kohya .alpha (or diffusers' metadata lora_alpha) is ignored: every LoRA at alpha = rank"),
    Mutation("lora-scale-ignored", "sdfast/lora.py",
             "* (self.lora.scale * alpha / rank)", "* (alpha / rank)",
             ("tests/test_lora.py", "-k", "scale_counts"),
             "--lora FILE:0.5 applies the LoRA at full strength"),
    Mutation("lora-restore-skipped", "sdfast/lora.py",
             "            self._param(key).copy_(self._base.pop(key))\n", "            self._base.pop(key)\n",
             ("tests/test_lora.py", "-k", "restores_the_base"),
             "set_loras([]) forgets the base weights instead of putting them back"),
    Mutation("lora-stacks-on-the-last-set", "sdfast/lora.py",
             "p.copy_((base.float() + delta.to(base.device)).to(p.dtype))",
             "p.copy_((p.float() + delta.to(base.device)).to(p.dtype))",
             ("tests/test_lora.py", "-k", "a_then_b_then_a"),
             "a new set is added on top of the weights the last set left, not on the base"),
    Mutation("lora-rank-unchecked", "sdfast/lora.py",
             "    if up.shape[1] != down.shape[0] or up.shape[0] != shape[0]:\n",
             "    if up.shape[0] != shape[0]:\n",
             ("tests/test_lora.py", "-k", "not_a_fitting_lora"),
             "an up/down pair of different ranks ends in a matmul traceback, not one line"),
    Mutation("lora-scale-bound", "sdfast/lora.py",
             "abs(float(scale)) > MAX_SCALE", "abs(float(scale)) >= MAX_SCALE",
             ("tests/test_lora.py", "-k", "scale_bounds"),
             "a LoRA at exactly the largest scale is refused"),
    Mutation("lora-pickle-opened", "sdfast/lora.py",
             "    if path.suffix.lower() != \".safetensors\":\n", "    if False:\n",
             ("tests/test_lora.py", "-k", "unsafe_or_missing"),
             "a .ckpt LoRA is handed to a reader instead of refused as a pickle that can run code"),
    Mutation("lora-slots-scale-ignored", "sdfast/lora_slots.py",
             "                    u, d = m.factors()\n", "                    u, d = m.factors()\n                    u = u / m.lora.scale\n",
             ("tests/test_lora_slots.py", "-k", "scale_reaches and onnxruntime"),
             "a LoRA on slot engines runs at scale 1 whatever scale was asked"),
    Mutation("lora-slots-stack-overwrites", "sdfast/lora_slots.py",
             "                    at += r\n", "",
             ("tests/test_lora_slots.py", "-k", "equal_eager_with_that_set and onnxruntime"),
             "two LoRAs on slot engines: the second overwrites the first's ranks instead of adding to them"),
    Mutation("lora-slots-rank-overflow-unchecked", "sdfast/lora_slots.py",
             "                    if at + r > table.rank:\n", "                    if at + r > table.rank + r:\n",
             ("tests/test_lora_slots.py", "-k", "full_rank_fits and onnxruntime"),
             "a set whose ranks overflow the slots ends in a tensor-shape traceback, not one line"),
    Mutation("lora-slots-not-bound", "sdfast/engines/onnxruntime.py",
             "        slots = self.slot_inputs  # this call's", "        slots = self.lora_slots and self.lora_slots.zeros(self.slot_dtype)  # this call's",
             ("tests/test_lora_slots.py", "-k", "equal_eager_with_that_set and onnxruntime"),
             "ORT slot engines run with zero slots whatever set was swapped in"),
    Mutation("lora-slots-io-unchecked", "sdfast/engines/base.py",
             "    table.check_io(inputs[n:], slot_type, path, hint)\n", "",
             ("tests/test_lora_slots.py", "-k", "slots_differ"),
             "an engine file whose slot inputs differ from the manifest's slot table loads, and fails mid-generation"),
    Mutation("inpaint-blend-noise-level-of-this-step", "sdfast/inpaint.py",
             "            proper = sched.add_noise(self.image_latents, self.noise, i + 1)\n",
             "            proper = sched.add_noise(self.image_latents, self.noise, i)\n",
             ("tests/test_inpaint.py", "-k", "blending_matches and euler-1.0-7.5"),
             "latent blending puts the kept region back at this step's noise level instead of the next one's"),
    Mutation("inpaint-unused-draw-skipped", "sdfast/inpaint.py",
             "            torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)\n", "",
             ("tests/test_inpaint.py", "-k", "blending_matches and euler_a"),
             "blending skips diffusers' masked-image draw: every ancestral step's noise differs from diffusers'"),
    Mutation("inpaint-nine-encodes-at-full-strength", "sdfast/inpaint.py",
             "        if not (nine and full):\n", "        if True:\n",
             ("tests/test_inpaint.py", "-k", "nine_channel and euler-1.0"),
             "a 9-channel U-Net at strength 1 draws the init image's posterior that diffusers skips"),
    Mutation("inpaint-not-in-batch-key", "sdfast/runtime.py",
             "\"lora_key\", \"inpainting\")", "\"lora_key\")",
             ("tests/test_inpaint.py", "-k", "different_masks"),
             "an img2img and an inpainting request share a loop: one of them runs as the other"),
    Mutation("inpaint-paste-skipped", "sdfast/runtime.py",
             "            if r.paste_unmasked:\n", "            if False:\n",
             ("tests/test_inpaint.py", "-k", "new_colour"),
             "--paste-unmasked leaves the VAE's approximation of the kept region"),
    Mutation("stream-estimate-is-the-noisy-latents", "sdfast/loop.py",
             "            s.x0 = sched.predicted_x0(eps, i, s.latents)\n", "            s.x0 = s.latents\n",
             ("tests/test_stream.py", "-k", "converge"),
             "partial images decode the noisy latents, not the estimate of the clean image"),
    Mutation("stream-vp-v-prediction-sign", "sdfast/schedulers/base.py",
             "        return a * x - b * model_output\n", "        return a * x + b * model_output\n",
             ("tests/test_stream.py", "-k", "pred_original_sample and v_prediction"),
             "the v-prediction estimate (and DPM-Solver's data prediction) takes the velocity with the wrong sign"),
    Mutation("stream-partials-spread-to-the-end", "sdfast/stream.py",
             "        i = first + (j * n) // (k + 1) - 1\n", "        i = first + (j * n) // k - 1\n",
             ("tests/test_stream.py", "-k", "partial_steps"),
             "the last partial image falls on the final step and is dropped: K asked, K - 1 sent"),
    Mutation("stream-client-gone-not-noticed", "sdfast/serve/streaming.py",
             "        finally:  # also when the client disconnects (the generator is closed)\n            gone.set()\n",
             "        finally:  # also when the client disconnects (the generator is closed)\n",
             ("tests/test_serve_edits.py", "-k", "leaves_mid_stream"),
             "a client that hangs up mid-stream leaves its generation running to the end"),
    Mutation("stream-batched-with-others", "sdfast/serve/service.py",
             "        if id(req) in self._streams:  # its partial images are its rows alone\n",
             "        if False:  # its partial images are its rows alone\n",
             ("tests/test_serve_edits.py", "-k", "never_shares_a_loop"),
             "a streamed request batched with others runs without its partial images"),
    Mutation("edit-mask-size-unchecked", "sdfast/serve/edits.py",
             "    if (w, h) != size:\n", "    if False:\n",
             ("tests/test_serve_edits.py", "-k", "small-mask"),
             "a mask of another size than the image is silently stretched over it"),
    Mutation("edit-pixel-limit-off-by-one", "sdfast/serve/edits.py",
             "    if w * h > max_pixels:\n", "    if w * h >= max_pixels:\n",
             ("tests/test_serve_edits.py", "-k", "pixel_limit"),
             "an upload of exactly --max-upload-pixels is refused"),
    Mutation("edit-field-twice-kept", "sdfast/serve/edits.py",
             "        if name in seen:\n", "        if False:\n",
             ("tests/test_serve_edits.py", "-k", "twice"),
             "a form field sent twice is taken silently (the last one wins)"),
    Mutation("lora-ldm-output-blocks-from-1", "sdfast/lora_ldm.py",
             "        first = 1 if kind == \"down_blocks\" else 0\n", "        first = 1\n",
             ("tests/test_lora.py", "-k", "ldm"),
             "an LDM-named LoRA's output_blocks layers land one entry further on (another layer changes)"),
    Mutation("lora-not-in-batch-key", "sdfast/runtime.py",
             "\"cache_branch\", \"lora_key\", \"inpainting\")", "\"cache_branch\", \"inpainting\")",
             ("tests/test_serve_lora.py", "-k", "never_share_a_loop"),
             "requests with different LoRA sets share one loop: all of them run with the first one's"),
    Mutation("lora-text-model-prefix-unmapped", "sdfast/lora.py",
             "        layers.update({f\"text_model.{n}\": v for n, v in list(layers.items())})\n", "        pass\n",
             ("tests/test_lora.py", "-k", "each_format and kohya"),
             "text-encoder LoRAs (text_model.… keys) are refused on transformers 5's flattened CLIP"),
    Mutation("lora-te2-to-te1", "sdfast/lora.py",
             "\"lora_te2_\": \"text_encoder_2\"", "\"lora_te2_\": \"text_encoder\"",
             ("tests/test_lora.py", "-k", "sdxl_lora_matches and kohya"),
             "kohya's lora_te2_ layers go to SDXL's first text encoder"),
    Mutation("lora-restore-not-pushed", "sdfast/lora.py",
             "        changed = set(self._base) | set(deltas)\n", "        changed = set(deltas)\n",
             ("tests/test_lora.py", "-k", "engines_that_swap"),
             "set_loras([]) on an inductor pipeline restores the base copy but leaves the package's weights fused"),
    Mutation("lora-engine-check-skipped", "sdfast/lora.py",
             "        self._check_engines(changed)\n", "",
             ("tests/test_lora.py", "-k", "engines_that_swap"),
             "a package lacking a weight fails after the base copy changed, leaving the two apart"),
    Mutation("deepcache-feature-channels", "sdfast/model/components.py",
             "    channels = blocks[-1] if entry == 0 else up[entry - 1]\n",
             "    channels = blocks[-1] if entry == 0 else up[entry]\n",
             ("tests/test_deepcache_export.py", "-k", "feature_spec"),
             "the exported DeepCache feature's spec takes the channels of the wrong up layer"),
    Mutation("deepcache-export-branch-unchecked", "sdfast/deepcache.py",
             "    if have != branch:\n", "    if False:\n",
             ("tests/test_deepcache_export.py", "-k", "branch_other_than"),
             "a run's --cache-branch other than the exported one runs on graphs cut elsewhere"),
    Mutation("deepcache-export-shallow-never", "sdfast/deepcache.py",
             "        full = self._cache is None or key != self._key or self._since_full >= self.interval\n",
             "        full = True\n",
             ("tests/test_deepcache_export.py", "-k", "onnxruntime_deepcache"),
             "--cache-interval on an export silently runs every step full (no approximation, no speed-up)"),
    Mutation("serve-batch-key-retokenizes", "sdfast/serve/service.py",
             "        chunks = self._chunks.get(id(req))\n", "        chunks = None\n",
             ("tests/test_serve.py", "-k", "tokenized"),
             "the served batch key tokenizes each request again instead of reusing parse's chunk count"),
    Mutation("hub-download-misses-second-encoder", "sdfast/model/folder.py",
             '"text_encoder*/*.safetensors",', '"text_encoder/*.safetensors",',
             ("tests/test_folder_layouts.py", "-k", "hub"),
             "an SDXL hub id downloads without text_encoder_2's weights"),
    Mutation("sdxl-family-without-size-conditioning", "sdfast/model/components.py",
             "text_encoders=(\"text_encoder\", \"text_encoder_2\"), size_conditioning=True,",
             "text_encoders=(\"text_encoder\", \"text_encoder_2\"), size_conditioning=False,",
             ("tests/test_sdxl.py", "-k", "empty_negative or variants_match"),
             "SDXL's record loses its size conditioning: force_zeros_for_empty_prompt is never read"),
)


def stale_reason(m: Mutation, root: Path) -> str | None:
    """Why the mutation cannot be applied in ``root``, or None when its target occurs exactly once."""
    target = root / m.path
    if not target.is_file():
        return "file missing"
    found = target.read_text(encoding="utf-8").count(m.old)
    return None if found == 1 else f"target text found {found} times, not once"


def tracked_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files: what the working tree holds, without caches."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (root / p).is_file()]


def make_copy(root: Path, dest: Path) -> None:
    for rel in tracked_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def test_env(copy: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(copy), OMP_NUM_THREADS="1", SDFAST_CACHE=str(cache),
               # A mutated file and its restored original can share size and mtime: never trust a .pyc.
               PYTHONDONTWRITEBYTECODE="1")
    return env


def check_imports_copy(copy: Path, env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-c", "import sdfast; print(sdfast.__file__)"], cwd=copy, env=env,
                       capture_output=True, text=True)
    where = Path(r.stdout.strip() or "?").resolve()
    if r.returncode != 0 or copy.resolve() not in where.parents:
        sys.exit(f"mutate: the copy's tests would import sdfast from {where}, not from {copy}; {r.stderr[-500:]}")


def run_tests(args: tuple[str, ...], copy: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = (r.stdout + r.stderr).strip().splitlines()
    # Killed: name the test that caught it (-q's summary line "FAILED node - reason").
    failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return r.returncode, (failed[0][:200] if failed else lines[-1] if lines else "")


def outcome(rc: int | None) -> str:
    # pytest: 0 all passed, 1 some failed, 2 interrupted (collection error), 5 no tests collected.
    return {0: "survived", 1: "killed"}.get(rc, "error")


def baseline_args(mutations: list[Mutation]) -> list[tuple[str, ...]]:
    """The distinct test selections, each run once unmutated."""
    seen: list[tuple[str, ...]] = []
    for m in mutations:
        if m.tests not in seen:
            seen.append(m.tests)
    return seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--check", action="store_true",
                   help="only check that every target text is still in the code, once (seconds, no tests)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = p.parse_args(argv)

    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        p.error(f"unknown mutation(s) {', '.join(unknown)}; choose from {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTATIONS)
    if args.list:
        for m in chosen:
            print(f"{m.name:36} {m.path:30} {' '.join(m.tests)}\n{'':36} {m.bug}")
        return 0

    if args.check:
        stale = [(m, d) for m in chosen if (d := stale_reason(m, ROOT))]
        for m, detail in stale:
            print(f"stale     {m.name}: {m.path}: {detail}")
        print(f"{len(chosen) - len(stale)} of {len(chosen)} targets found once")
        return 1 if stale else 0

    with tempfile.TemporaryDirectory(prefix="sdfast-mutate-") as tmp:
        copy, cache = Path(tmp) / "repo", Path(tmp) / "cache"
        make_copy(ROOT, copy)
        env = test_env(copy, cache)
        check_imports_copy(copy, env)

        if not args.no_baseline:
            for sel in baseline_args(chosen):
                t0 = time.perf_counter()
                rc, tail = run_tests(sel, copy, env, args.timeout)
                print(f"baseline {' '.join(sel)}: {tail} ({time.perf_counter() - t0:.0f} s)", flush=True)
                if rc != 0:
                    print("mutate: the tests fail without any mutation; fix them first", file=sys.stderr)
                    return 1

        rows = []
        for m in chosen:
            target = copy / m.path
            detail = stale_reason(m, copy)
            if detail:
                rows.append((m, "stale", detail, 0.0))
            else:
                original = target.read_text(encoding="utf-8")
                target.write_text(original.replace(m.old, m.new), encoding="utf-8")
                t0 = time.perf_counter()
                try:
                    rc, tail = run_tests(m.tests, copy, env, args.timeout)
                finally:
                    target.write_text(original, encoding="utf-8")
                rows.append((m, outcome(rc), tail, time.perf_counter() - t0))
            r = rows[-1]
            print(f"{r[1]:9} {m.name} ({r[3]:.0f} s): {r[2]}", flush=True)

    print()
    print(f"| {'mutation':36} | {'file':30} | {'result':8} | seconds |")
    print(f"|{'-' * 38}|{'-' * 32}|{'-' * 10}|---------|")
    for m, result, _, seconds in rows:
        print(f"| {m.name:36} | {m.path:30} | {result:8} | {seconds:7.0f} |")
    bad = [m.name for m, result, _, _ in rows if result != "killed"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} killed" + (f"; not killed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
