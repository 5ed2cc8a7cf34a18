"""Vectors: ResNet-50 without its classification layer, run in batches, with a stable model identity.

The identity string (architecture, weights, preprocessing, and precision where it changes the vectors) is
stored on every row, so vectors from different models are never compared with each other.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ImsearchError, WeightsUnavailable
from .checksums import file_sha256
from .choices import DEVICES, PRECISIONS
from .pixels import DEFAULT_PREPROCESS, MEAN, STD, Preprocess

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedWeights:
    """A torchvision ResNet50_Weights entry: where it downloads from and the resize/crop of its recipe."""

    url: str
    resize: int
    crop: int


# torchvision.models.ResNet50_Weights (checked against torchvision by tests/test_embed.py): known here so that a
# search needs no torchvision import, which costs about a second.
WEIGHTS = {
    "IMAGENET1K_V1": NamedWeights("https://download.pytorch.org/models/resnet50-0676ba61.pth", 256, 224),
    "IMAGENET1K_V2": NamedWeights("https://download.pytorch.org/models/resnet50-11ad3fa6.pth", 232, 224),
}
WEIGHTS_ALIASES = {"DEFAULT": "IMAGENET1K_V2"}


class Model(Protocol):
    """What ingest, find and the web page need of a model, whichever runtime runs it (imsearch.model.runtimes)."""

    identity: str
    prep: Preprocess
    backend: str
    device: str
    precision: str

    def embed(self, batch: np.ndarray) -> np.ndarray: ...


def weights_label(weights: str) -> str:
    """The weights part of the identity: the torchvision name, or `file-<sha256 prefix>` for a local file."""
    named = named_weights(weights)
    if named is not None:
        return named[0]
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"{weights}: weights file not found")
    return "file-" + file_sha256(path)[:16]


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, TORCH_HOME defaulting to
    $XDG_CACHE_HOME/torch or ~/.cache/torch (tests/test_backends.py checks it against torch)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def checkpoint_file(weights: str) -> Path:
    """Where the weights' checkpoint lies: the file given, or torch.hub's copy of a named download (which may not
    be there yet)."""
    named = named_weights(weights)
    if named is None:
        return Path(weights).expanduser()
    return torch_hub_dir() / "checkpoints" / Path(named[1].url).name


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ImsearchError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ImsearchError("--device cuda: no CUDA device is available (use --device cpu)")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """`auto` is fp32: reduced precision is opt-in until it is shown to keep the vectors (docs/scaling.md)."""
    if precision not in PRECISIONS:
        raise ImsearchError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp32"
    if precision == "fp16" and device == "cpu":
        raise ImsearchError("--precision fp16 needs --device cuda; on the CPU use bf16 or fp32")
    if precision == "int8":
        raise ImsearchError("--precision int8 runs on ONNX Runtime only: use --backend onnx (or auto) on the CPU")
    return precision


def model_identity(weights: str, prep: Preprocess = DEFAULT_PREPROCESS, precision: str = "fp32") -> str:
    """The string stored per row. Reduced precision is recorded: its vectors differ from fp32's."""
    ident = f"resnet50:{weights_label(weights)}:{prep.id}"
    return ident if precision == "fp32" else f"{ident}:{precision}"


def named_weights(weights: str) -> tuple[str, NamedWeights] | None:
    """(canonical name, entry) for a torchvision weights name, None for a file path."""
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt") or path.exists():
        return None
    name = weights.removeprefix("ResNet50_Weights.")
    name = WEIGHTS_ALIASES.get(name, name)
    if name not in WEIGHTS:
        choices = ", ".join([*WEIGHTS, *WEIGHTS_ALIASES])
        raise WeightsUnavailable(f"unknown weights {weights!r}: use one of {choices}, or a local .pth file")
    return name, WEIGHTS[name]


def recipe(weights: str) -> Preprocess:
    """The weights' own preprocessing (torchvision's `weights.transforms()`): resize, centre crop."""
    named = named_weights(weights)
    if named is None:
        return DEFAULT_PREPROCESS
    return Preprocess("recipe", named[1].resize, named[1].crop)


def _load_state(weights: str) -> Any:
    import torch

    named = named_weights(weights)
    if named is None:
        try:
            state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsUnavailable(f"{weights}: weights file not found") from None
        except Exception as exc:  # noqa: BLE001 - torch.load raises many kinds for a broken file
            raise WeightsUnavailable(f"{weights}: not a readable PyTorch checkpoint ({exc})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        return state
    name, entry = named
    filename = Path(entry.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        # torch.hub announces downloads on stdout, which belongs to results (--json); a terminal gets a bar.
        with contextlib.redirect_stdout(io.StringIO()):
            return torch.hub.load_state_dict_from_url(
                entry.url, map_location="cpu", progress=sys.stderr.isatty(), check_hash=True, weights_only=True
            )
    except Exception as exc:  # noqa: BLE001 - download failures surface as URLError, OSError, RuntimeError...
        raise WeightsUnavailable(
            f"cannot download ResNet-50 weights {name} ({type(exc).__name__}: {str(exc)[:120]}); "
            f"put {filename} at {cached} or pass --weights FILE.pth"
        ) from None


def _load_network(weights: str) -> torch.nn.Module:
    from .resnet import ResNet50

    state = _load_state(weights)
    model = ResNet50()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise WeightsUnavailable(f"{weights}: not a ResNet-50 state_dict ({first})") from None
    return model


class Embedder:
    """ResNet-50 with fc removed: uint8 HxWx3 batches in, 2048-d float32 vectors out."""

    backend = "torch"

    def __init__(
        self,
        weights: str,
        *,
        device: str = "auto",
        precision: str = "auto",
        prep: Preprocess = DEFAULT_PREPROCESS,
    ) -> None:
        import torch

        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.prep = recipe(weights) if prep.name == "recipe" else prep
        self.weights = weights
        self.identity = model_identity(weights, self.prep, self.precision)
        model = _load_network(weights)
        model.fc = torch.nn.Identity()
        model.eval()
        model = model.to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model
        self._mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1) * 255.0
        self._lock = threading.Lock()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 array N x H x W x 3 -> float32 N x 2048 (not normalised: cosine distance ignores length)."""
        import torch

        if batch.ndim == 3:
            batch = batch[None]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with self._lock, torch.inference_mode():
            writable = np.array(batch, copy=not batch.flags.writeable, order="C")
            x = torch.from_numpy(writable).to(self.device, non_blocking=True)
            # NHWC -> NCHW view: already channels-last in memory, as the model wants.
            x = x.permute(0, 3, 1, 2).float().sub_(self._mean).div_(self._std)
            x = x.contiguous(memory_format=torch.channels_last)
            if dtype is None:
                out = self.model(x)
            else:
                with torch.autocast(device_type=self.device, dtype=dtype):
                    out = self.model(x)
            return out.float().cpu().numpy()


_cache: dict[tuple[str, str, str, str], Embedder] = {}
_cache_lock = threading.Lock()


def get_embedder(
    weights: str, *, device: str = "auto", precision: str = "auto", prep: Preprocess = DEFAULT_PREPROCESS
) -> Embedder:
    """One Embedder per (weights, device, precision, preprocessing) per process: the model loads once."""
    key = (str(weights), device, precision, prep.name)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = Embedder(weights, device=device, precision=precision, prep=prep)
        return _cache[key]
