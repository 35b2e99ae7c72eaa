"""Shared fixtures: the tiny random model, built once per session into a private cache."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Tests never read or write the user's cache; the tiny model is rebuilt from its seed (~2 s).
    os.environ["SDFAST_CACHE"] = str(tmp_path_factory.mktemp("sdfast-cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(scope="session")
def tiny_info(_private_cache):
    from sdfast.models import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_info):
    import sdfast

    return sdfast.load(tiny_info.path)


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_info):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_info.path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
