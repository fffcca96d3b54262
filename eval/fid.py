"""FID, KID (torchmetrics, pluggable feature extractor) and CLIPScore (open_clip), offline.

FID (Heusel et al. 2017) = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of Gaussian fits
to features; KID (Binkowski et al. 2018) = unbiased MMD^2 with the cubic polynomial kernel, mean and std
over random subsets. Features: the judge's ([N x 320]) in the embedded world; Inception-v3 pool3
([N x 2048], torchmetrics' torch-fidelity port) only from a weights file the user gives -- nothing is
downloaded. CLIPScore (Hessel et al. 2021, torchmetrics' scaling): 100 * max(cos(image, caption), 0),
averaged, with an open_clip model and its weights file.

    prompt-cdm eval fid --real runs/tifa/base --fake runs/gen/base --features judge --out runs/fid_base.json
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .errors import EvalError


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """[N x D] and [M x D] features -> Fréchet distance of their Gaussian fits (float64)."""
    a, b = feats_a.double(), feats_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("FID needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    ra = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(ra @ s_b @ ra)
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * torch.trace(cross))


# ---------------------------------------------------------------- feature extractors


class JudgeFeatures(nn.Module):
    """The judge as torchmetrics' feature extractor: uint8 images [N x 3 x H x W] -> [N x 320]."""

    def __init__(self, judge=None):
        super().__init__()
        if judge is None:
            from prompt_cdm.world.judge import Judge

            try:
                judge = Judge.load()
            except FileNotFoundError as e:
                raise EvalError(str(e)) from None
        self.judge = judge
        self.num_features = int(judge.net.cfg.feature_dim + 4 * judge.net.cfg.width)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float() / 127.5 - 1.0 if imgs.dtype == torch.uint8 else imgs.float() * 2 - 1
        return self.judge.features(x).double()


def inception_features(weights: str | Path | None = None) -> nn.Module:
    """torchmetrics' Inception-v3 (pool3, 2048-d) from the FID weights file the user has
    (pt_inception-2015-12-05-6726825d.pth, torch-fidelity's; FIDs comparable with published ones)."""
    if weights is None or not Path(weights).is_file():
        raise EvalError("Inception features need the FID weights file (--weights "
                        f"pt_inception-2015-12-05-6726825d.pth; got {weights!r}); nothing is downloaded -- use "
                        "--features judge in the embedded world")
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:
        raise EvalError("Inception features need the package 'torch-fidelity', which is not installed: "
                        "pip install torch-fidelity")
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=str(weights))


FEATURES: dict[str, Callable[..., nn.Module]] = {
    "judge": lambda weights=None: JudgeFeatures(),
    "inception": inception_features,
}


def feature_extractor(name: str, weights: str | Path | None = None) -> nn.Module:
    if name not in FEATURES:
        raise EvalError(f"unknown FID features {name!r}; valid: {', '.join(sorted(FEATURES))}")
    return FEATURES[name](weights=weights)


# ---------------------------------------------------------------- images


def to_uint8(images) -> torch.Tensor:
    """PIL images, uint8 arrays [N x H x W x 3] or a uint8 tensor [N x 3 x H x W] -> uint8 [N x 3 x H x W]."""
    import numpy as np

    if torch.is_tensor(images):
        if images.dtype != torch.uint8:
            raise ValueError(f"image tensors must be uint8 [N x 3 x H x W], got {images.dtype}")
        return images
    arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@dataclass
class ImageFolder:
    """A folder's images (sorted by file name) and their captions from metadata.jsonl (None if absent)."""

    paths: list[Path]
    images: list
    captions: list[str] | None


def read_folder(folder: str | Path) -> ImageFolder:
    """Every .png/.jpg/.jpeg/.webp image of a folder; captions when metadata.jsonl names every one."""
    import json

    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise EvalError(f"image folder {folder} holds no .png/.jpg/.jpeg/.webp image")
    images = []
    for p in files:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    captions = None
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        text = {}
        for ln, line in enumerate(meta.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{meta}:{ln}: not valid JSON ({e.msg})") from None
                text[Path(str(row.get("file_name", ""))).name] = row.get("text")
        if all(text.get(p.name) for p in files):
            captions = [text[p.name] for p in files]
    return ImageFolder(files, images, captions)


# ---------------------------------------------------------------- metrics


class _Features(nn.Identity):
    """Identity 'extractor' for torchmetrics when the features are computed once outside it."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def fid_kid_features(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     seed: int = 0) -> dict:
    """FID and KID (torchmetrics) of feature sets [N x D] and [M x D], in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = real.double(), fake.double()
    if len(real) < 2 or len(fake) < 2:
        raise EvalError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} fake")
    size = min(kid_subset_size, len(real), len(fake))
    ident = _Features(real.shape[1])
    fid = FrechetInceptionDistance(feature=ident)
    with warnings.catch_warnings():  # KID's notice that it buffers every feature (ours are in memory anyway)
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=ident, subsets=kid_subsets, subset_size=size)
    for m in (fid, kid):
        m.update(real, real=True)
        m.update(fake, real=False)
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws its subsets from torch's global generator
    try:
        kid_mean, kid_std = kid.compute()
    finally:
        torch.random.set_rng_state(rng)
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subset_size": size, "n_real": len(real), "n_fake": len(fake)}


@torch.no_grad()
def extract(net: nn.Module, images, batch: int = 128) -> torch.Tensor:
    """[N x D] features of images (PIL list or uint8 [N x 3 x H x W]) through `net` (on its device), in
    batches; float64 on the CPU."""
    x = to_uint8(images)
    dev = next(net.parameters(), torch.empty(0, device="cpu")).device
    with torch.no_grad():
        return torch.cat([net(x[s: s + batch].to(dev)).double().cpu() for s in range(0, len(x), batch)])


def fid_kid(real, fake, features: str | nn.Module = "judge", weights: str | Path | None = None,
            kid_subsets: int = 100, kid_subset_size: int = 1000, batch: int = 128, seed: int = 0,
            device=None) -> dict:
    """FID and KID of `fake` against `real` images (PIL lists or uint8 [N x 3 x H x W]) through
    torchmetrics with a feature extractor: a name in FEATURES or any nn.Module (uint8 -> [N x D]) run on
    `device` (default CPU; the statistics are float64 on the CPU either way). Features are extracted once and
    fed to both metrics."""
    net = feature_extractor(features, weights) if isinstance(features, str) else features
    if device is not None:
        net = net.to(device)
    res = fid_kid_features(extract(net, real, batch), extract(net, fake, batch), kid_subsets, kid_subset_size, seed)
    res["features"] = features if isinstance(features, str) else type(features).__name__
    return res


def clip_score(images, captions: Sequence[str], arch: str, weights: str | Path, batch: int = 64,
               device: str = "cpu") -> float:
    """Mean CLIPScore, 100 * max(cos(image, caption), 0), with open_clip model `arch` (e.g. ViT-B-32)
    and its weights file (open_clip's .bin/.pt/.safetensors; hub tags are refused: nothing downloads)."""
    if len(images) != len(captions):
        raise EvalError(f"CLIPScore: {len(images)} images for {len(captions)} captions")
    if not Path(weights).is_file():
        raise EvalError(f"CLIPScore needs the open_clip weights file of {arch} (--clip-weights FILE); "
                        f"{weights} does not exist -- nothing is downloaded")
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights), device=device)
        tokenizer = open_clip.get_tokenizer(arch)
    except (RuntimeError, ValueError, OSError) as e:
        raise EvalError(f"cannot load open_clip {arch} from {weights}: {str(e).splitlines()[0]}") from None
    model.eval()
    scores = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.stack([preprocess(im.convert("RGB")) for im in images[s: s + batch]]).to(device)
            t = tokenizer(list(captions[s: s + batch])).to(device)
            a = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            b = torch.nn.functional.normalize(model.encode_text(t).float(), dim=-1)
            scores.append(100 * (a * b).sum(-1).clamp(min=0))
    return float(torch.cat(scores).mean())
