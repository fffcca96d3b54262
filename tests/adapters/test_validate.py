"""One validator of an adapter folder: what `registry add` accepts, `hub push` accepts, and the refusals
read the same (adapters.validate.check_adapter_folder behind load_adapter, Registry.add and the hub)."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import save_random_adapters
from prompt_cdm.adapters.errors import AdapterError
from prompt_cdm.adapters.store import WEIGHTS_NAME
from prompt_cdm.adapters.validate import check_adapter_folder
from prompt_cdm.hub.hub import HubError
from prompt_cdm.hub.hub import check_adapter_folder as hub_check
from prompt_cdm.registry.registry import Registry, RegistryError


def _foreign_key(folder):
    t = load_file(folder / WEIGHTS_NAME)
    save_file({**t, "vae.encoder.lora_A.weight": torch.zeros(2, 4)}, str(folder / WEIGHTS_NAME))


def _huge(folder):
    t = load_file(folder / WEIGHTS_NAME)
    save_file({k: torch.full_like(v, float("inf")) for k, v in t.items()}, str(folder / WEIGHTS_NAME))


@pytest.mark.parametrize("damage,message", [
    (_foreign_key, r"'vae\.encoder\.lora_A\.weight' is not a LoRA key"),
    (_huge, r"is not finite floating point"),
    (lambda f: (f / "extra.npy").write_bytes(b"\x93NUMPY"), r"extra\.npy is a pickle file"),
])
def test_registry_add_and_hub_refuse_the_same_folders(pipe, tmp_path, damage, message):
    good = save_random_adapters(pipe, tmp_path / "src")["a"]
    reg = Registry.create(tmp_path / "reg", "tiny-random", pipe.backbone_fingerprint)
    assert check_adapter_folder(good).kind == "lora"
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    damage(bad)
    with pytest.raises(AdapterError, match=message):
        check_adapter_folder(bad)
    with pytest.raises(HubError, match=message):
        hub_check(bad)
    with pytest.raises(RegistryError, match=message):
        reg.add("bad", bad)
    assert reg.sources == [] and not (reg.folder / "adapters" / "bad").exists()
    reg.add("good", good)
    assert reg.sources == ["good"]
