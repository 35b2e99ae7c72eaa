"""Every SD folder layout users have: a tokenizer saved by transformers 5 (tokenizer.json only),
weights only as a ``variant`` (``*.fp16.safetensors``), legacy ``*.bin`` weights, and SD
releases' extra model_index entries. Each loads and matches diffusers on the same folder."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from test_pipeline_parity import assert_parity, run_diffusers

import sdfast
from sdfast.model.info import resolve_model


def derived(tiny_info, tmp_path, name):
    dest = tmp_path / name
    shutil.copytree(tiny_info.path, dest)
    return dest


def parity_on(folder, **diffusers_kw):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, **diffusers_kw)
    ref.set_progress_bar_config(disable=True)
    pipe = sdfast.load(folder)
    lat, img = run_diffusers(ref, pipe.info, "euler", prompt="a red circle", num_inference_steps=4,
                             guidance_scale=7.5, height=64, width=64, seed=1)
    out = pipe.generate("a red circle", steps=4, guidance_scale=7.5, seed=1, scheduler="euler")
    assert_parity(out, lat, img)
    return pipe


def test_a_tokenizer_json_only_folder_loads_and_matches_diffusers(tiny_info, tmp_path, tiny_pipe):
    folder = derived(tiny_info, tmp_path, "tokjson")
    shutil.rmtree(folder / "tokenizer")
    tiny_pipe.tokenizer.save_pretrained(folder / "tokenizer")  # transformers 5: tokenizer.json + config only
    for legacy in ("vocab.json", "merges.txt"):
        (folder / "tokenizer" / legacy).unlink(missing_ok=True)
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    pipe = parity_on(folder)
    assert pipe.tokenize(["a red circle"]).tolist() == tiny_pipe.tokenize(["a red circle"]).tolist()


def test_a_variant_only_folder_is_loaded_as_that_variant(tiny_info, tmp_path, caplog):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = derived(tiny_info, tmp_path, "fp16")
    for sub, cls in (("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        module = cls.from_pretrained(folder / sub).half()
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
        module.save_pretrained(folder / sub, variant="fp16")
        assert [f.name for f in (folder / sub).glob("*.safetensors")][0].endswith(".fp16.safetensors")
    with caplog.at_level(logging.INFO, logger="sdfast.model.info"):
        info = resolve_model(folder)
    assert info.variant == "fp16" and any("fp16-variant weights only" in r.getMessage() for r in caplog.records)
    parity_on(folder, variant="fp16")


def test_legacy_bin_weights_load_and_match_diffusers(tiny_info, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = derived(tiny_info, tmp_path, "bin")
    te = CLIPTextModel.from_pretrained(folder / "text_encoder")
    (folder / "text_encoder" / "model.safetensors").unlink()
    torch.save(te.state_dict(), folder / "text_encoder" / "pytorch_model.bin")
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        module = cls.from_pretrained(folder / sub)
        for f in (folder / sub).glob("*.safetensors"):
            f.unlink()
        module.save_pretrained(folder / sub, safe_serialization=False)
    assert not list(folder.rglob("*.safetensors")) and len(list(folder.rglob("*.bin"))) == 3
    parity_on(folder)


def test_release_extras_in_model_index_are_ignored_with_one_info_line(tiny_info, tmp_path, caplog):
    folder = derived(tiny_info, tmp_path, "release")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.INFO, logger="sdfast.model.info"):
        resolve_model(folder)
    lines = [r.getMessage() for r in caplog.records if "does not run" in r.getMessage()]
    assert len(lines) == 1 and "safety_checker" in lines[0] and "feature_extractor" in lines[0]


@pytest.mark.parametrize("remove", [("tokenizer.json", "merges.txt"), ("tokenizer.json", "vocab.json", "merges.txt")])
def test_a_tokenizer_folder_missing_its_files_names_them(tiny_info, tmp_path, remove):
    folder = derived(tiny_info, tmp_path, "broken")
    for name in remove:
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="lacks tokenizer/"):
        resolve_model(folder)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_hub_download_fetches_every_file_the_family_loads(family, monkeypatch, tmp_path):
    """A hub id is fetched with allow patterns; each family's configs, tokenizers and plain weights
    must match them (SDXL's text_encoder_2 once did not: the pattern was ``text_encoder/``)."""
    import fnmatch

    import huggingface_hub

    from sdfast.model import folder
    from sdfast.model.components import FAMILIES

    asked = {}
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: asked.setdefault("patterns", allow_patterns) and str(tmp_path))
    assert folder.download("org/model") == tmp_path
    encoders = FAMILIES[family].text_encoders
    needed = ["model_index.json", "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json",
              "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              *(f"{e}/config.json" for e in encoders), *(f"{e}/model.safetensors" for e in encoders),
              *(f"{e.replace('text_encoder', 'tokenizer')}/{n}" for e in encoders
                for n in ("vocab.json", "merges.txt", "tokenizer_config.json"))]
    missed = [p for p in needed if not any(fnmatch.fnmatch(p, pat) for pat in asked["patterns"])]
    assert not missed
    assert not fnmatch.fnmatch("text_encoder_2/model.safetensors", "text_encoder/*.safetensors")  # the old miss


def test_a_failed_hub_download_is_one_missing_file_naming_the_id(monkeypatch):
    import huggingface_hub

    from sdfast.errors import MissingFile
    from sdfast.model import folder

    def fail(repo_id, allow_patterns):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(MissingFile, match=r"^model: could not download 'org/model' from the hub \(OSError: no network\)"):
        folder.download("org/model")
