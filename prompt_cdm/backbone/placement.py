"""Where a backbone runs: one device and one dtype for the whole loaded pipeline.

    --device auto|cpu|cuda|cuda:N|mps      auto: the first CUDA device when one is visible, else the CPU
    --dtype  auto|fp32|fp16|bf16           auto: fp16 on CUDA, fp32 elsewhere

Every command that runs a model takes the two flags (and recipes the keys `device`, `dtype`); the Python
API takes them in `backbone.load(name, device=..., dtype=...)`. A device that is not there, an unknown
name, or a half precision the device cannot compute is refused with one line before any model loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICE_HELP = "where the models run: auto (the first CUDA device if visible, else cpu), cpu, cuda, cuda:N, mps"
DTYPE_HELP = "model precision: auto (fp16 on CUDA, else fp32), fp32, fp16, bf16"


class PlacementError(ValueError):
    """A device or dtype that cannot be used here; the message names the fix."""


@dataclass(frozen=True)
class Placement:
    """A device and dtype as the user spells them; `resolve()` turns them into torch objects, checked."""

    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        if not isinstance(self.device, str) or not DEVICE_RE.match(self.device):
            raise PlacementError(f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps")
        d = ALIASES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        if d != "auto" and d not in DTYPES:
            raise PlacementError(f"unknown dtype {self.dtype!r}; use auto, fp32, fp16 or bf16")
        object.__setattr__(self, "dtype", d)

    @classmethod
    def of(cls, device=None, dtype=None) -> "Placement":
        """From strings, torch objects or None (= auto)."""
        if isinstance(device, torch.device):
            device = str(device) if device.index is not None or device.type != "cuda" else "cuda"
        if isinstance(dtype, torch.dtype):
            names = {v: k for k, v in DTYPES.items()}
            if dtype not in names:
                raise PlacementError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
            dtype = names[dtype]
        return cls(device or "auto", dtype or "auto")

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        device = resolve_device(self.device)
        dtype = DTYPES["fp16" if device.type == "cuda" else "fp32"] if self.dtype == "auto" else DTYPES[self.dtype]
        check_dtype(device, dtype)
        return device, dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PlacementError(f"--device {name}: no CUDA device is visible here; use --device cpu (or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise PlacementError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PlacementError("--device mps: Apple's MPS backend is not available here; use --device cpu (or auto)")
    return torch.device(name)


_CHECKED: dict[tuple[str, torch.dtype], str | None] = {}


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dtype the device cannot compute: the ops a UNet step needs (convolution, group norm, SDPA,
    linear, softmax) are tried once on a few numbers."""
    if dtype == torch.float32:
        return
    key = (str(device), dtype)
    if key not in _CHECKED:
        try:
            x = torch.randn(1, 4, 8, 8, device=device, dtype=dtype)
            conv = torch.nn.functional.conv2d(x, torch.randn(4, 4, 3, 3, device=device, dtype=dtype), padding=1)
            h = torch.nn.functional.group_norm(conv, 2).flatten(2).transpose(1, 2)  # [1 x 64 x 4]
            a = torch.nn.functional.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None])
            y = torch.nn.functional.linear(a, torch.randn(4, 4, device=device, dtype=dtype)).softmax(-1)
            _CHECKED[key] = None if y.dtype == dtype else f"ops return {y.dtype}"
        except (RuntimeError, NotImplementedError) as e:
            _CHECKED[key] = str(e).splitlines()[0]
    if _CHECKED[key] is not None:
        name = {v: k for k, v in DTYPES.items()}[dtype]
        raise PlacementError(f"--dtype {name} cannot run on {device} with this torch build ({_CHECKED[key]}); "
                             "use --dtype fp32" + (" or bf16" if dtype == torch.float16 else ""))
