"""Vectors: imsearch's fast path against torchvision's own recipe, and the model identity."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from imsearch import WeightsUnavailable
from imsearch.model import pixels
from imsearch.model.embed import get_embedder, model_identity
from tests.conftest import ROOMS


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference(weights):
    """torchvision's recipe, untouched: full decode, weights.transforms()-style preprocessing, fc removed."""
    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval()
    transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize(256), torchvision.transforms.CenterCrop(224), torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(pixels.MEAN, pixels.STD)])

    def embed(img: Image.Image) -> np.ndarray:
        with torch.inference_mode():
            return model(transform(img.convert("RGB"))[None])[0].numpy()

    return embed


def test_vectors_match_torchvisions_recipe(weights, reference):
    embedder = get_embedder(weights, device="cpu")
    files = [sorted((ROOMS / "base" / c).glob("*.jpg"))[0] for c in ("kitchen", "bedroom", "bathroom")]
    ours = embedder.embed(np.stack([pixels.load(f.read_bytes(), str(f)).pixels for f in files]))
    for f, v in zip(files, ours):
        assert cosine(v, reference(Image.open(f))) >= 0.99


def test_draft_decoding_of_a_large_jpeg_keeps_the_vector(weights, reference):
    src = Image.open(sorted((ROOMS / "base" / "living_room").glob("*.jpg"))[0]).resize((4032, 3024))
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=90)
    fast = get_embedder(weights, device="cpu").embed(pixels.load(buf.getvalue(), "big.jpg").pixels)[0]
    assert cosine(fast, reference(Image.open(io.BytesIO(buf.getvalue())))) >= 0.99


def test_network_is_torchvisions_resnet50(weights):
    from imsearch.model.resnet import ResNet50

    state = torch.load(weights, weights_only=True)
    ours, theirs = ResNet50(), torchvision.models.resnet50()
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)


def test_weights_table_matches_torchvision():
    from imsearch.model.embed import WEIGHTS, WEIGHTS_ALIASES

    for name, entry in WEIGHTS.items():
        tv = torchvision.models.ResNet50_Weights[name]
        transforms = tv.transforms()
        assert (entry.url, [entry.resize], [entry.crop]) == (tv.url, transforms.resize_size, transforms.crop_size)
    for alias, name in WEIGHTS_ALIASES.items():
        assert torchvision.models.ResNet50_Weights[alias] is torchvision.models.ResNet50_Weights[name]


def test_identity_names_weights_file_and_preprocessing(weights, other_weights):
    ident = model_identity(weights)
    assert ident.startswith("resnet50:file-") and ident.endswith(":resize256-crop224")
    assert model_identity(other_weights) != ident
    assert model_identity("IMAGENET1K_V1") == "resnet50:IMAGENET1K_V1:resize256-crop224"
    assert model_identity(weights, pixels.PREPROCESSING["square224"]) != ident


def test_missing_or_broken_weights_file_is_one_clear_line(tmp_path):
    with pytest.raises(WeightsUnavailable, match="weights file not found"):
        get_embedder(str(tmp_path / "nope.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"garbage")
    with pytest.raises(WeightsUnavailable, match="not a readable PyTorch checkpoint"):
        get_embedder(str(broken))


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(WeightsUnavailable, match="IMAGENET1K_V2"):
        get_embedder("IMAGENET9K")
