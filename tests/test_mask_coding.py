"""Mask codec: streaming float64 PCA, whitening, round trips, soft labels, persistence."""
import numpy as np
import pytest
import torch

from istr.models.mask_coding import MaskCodec, fit_pca, soften

R = 8  # small masks keep the eigendecompositions instant


def random_masks(n, seed=0, resolution=R):
    """Binary rectangles/ellipses of random extent: a realistic, structured mask distribution."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, resolution), torch.linspace(-1, 1, resolution), indexing="ij")
    a = torch.rand(n, 1, 1, generator=g) * 0.8 + 0.3
    b = torch.rand(n, 1, 1, generator=g) * 0.8 + 0.3
    ellipse = torch.rand(n, 1, 1, generator=g) < 0.5
    inside_e = (xs / a) ** 2 + (ys / b) ** 2 <= 1
    inside_r = (xs.abs() <= a) & (ys.abs() <= b)
    return torch.where(ellipse, inside_e, inside_r).to(torch.uint8)


def test_soften_values_and_distribution():
    binary = torch.zeros(200, R, R, dtype=torch.uint8)
    binary[:, :4] = 1
    soft = soften(binary, 0.01, 0.05, torch.Generator().manual_seed(0))
    r = torch.where(binary.bool(), 1 - soft, soft)
    assert r.min() >= 0.01 - 1e-7 and r.max() <= 0.05 + 1e-7
    # r = max(0.05 U, 0.01) equals 0.01 with probability 0.2
    assert abs((r <= 0.01 + 1e-7).float().mean().item() - 0.2) < 0.02


def test_pca_recovers_planted_low_rank_structure():
    # masks = union of 3 disjoint pixel blocks, each present independently: in logit space the data is
    # mean + 3 block directions + small soft-label noise, so the first 3 components must span the blocks
    blocks = torch.zeros(3, R * R, dtype=torch.float64)
    blocks[0, :10], blocks[1, 20:36], blocks[2, 40:47] = 1, 1, 1
    g = torch.Generator().manual_seed(1)
    present = (torch.rand(20000, 3, generator=g) < torch.tensor([0.5, 0.3, 0.2])).double()
    masks = (present @ blocks).view(-1, R, R).to(torch.uint8)
    codec = fit_pca([masks[i:i + 5000] for i in range(0, 20000, 5000)], 3, resolution=R)
    basis = torch.nn.functional.normalize(blocks, dim=1).T  # [R*R, 3] orthonormal
    overlap = torch.linalg.svdvals(codec.components.double() @ basis)  # cosines of the principal angles
    assert overlap.min() > 0.999
    assert codec.cumulative_explained_variance()[-1] > 0.9
    assert codec.metadata["count"] == 20000


def test_streaming_fit_equals_numpy_one_shot_svd():
    masks = random_masks(600, seed=2)
    codec = fit_pca([masks[:100], masks[100:350], masks[350:]], 10, seed=5, resolution=R)
    # the same soft labels, drawn in one shot with the same generator sequence
    g = torch.Generator().manual_seed(5)
    soft = torch.cat([soften(m, 0.01, 0.05, g) for m in (masks[:100], masks[100:350], masks[350:])]).double()
    x = torch.logit(soft).flatten(1).numpy()
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / (len(x) - 1)
    np.testing.assert_allclose(codec.mean.numpy(), x.mean(0), atol=1e-5)
    np.testing.assert_allclose(codec.explained_variance.numpy(), var[:10], rtol=1e-5)
    # components equal up to sign
    dots = np.abs(np.sum(codec.components.double().numpy() * vt[:10], axis=1))
    np.testing.assert_allclose(dots, 1.0, atol=1e-5)
    np.testing.assert_allclose(codec.total_variance.item(), var.sum(), rtol=1e-6)


def test_whitened_codes_have_unit_variance_on_fit_data():
    masks = random_masks(2000, seed=3)
    codec = fit_pca([masks[:1000], masks[1000:]], 12, seed=7, resolution=R)
    g = torch.Generator().manual_seed(7)
    soft = torch.cat([soften(masks[:1000], 0.01, 0.05, g), soften(masks[1000:], 0.01, 0.05, g)])
    codes = codec.encode(soft).double()
    assert torch.allclose(codes.mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-3)
    cov = torch.cov(codes.T)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=2e-3)


def test_full_basis_round_trip_and_explained_variance():
    masks = random_masks(1500, seed=4, resolution=28)
    codec = fit_pca([masks[:700], masks[700:]], 784, resolution=28)
    soft = soften(masks[:50], 0.01, 0.05, torch.Generator().manual_seed(9))
    assert (codec.decode(codec.encode(soft)) - soft).abs().max() < 1e-4
    cumulative = codec.cumulative_explained_variance()
    assert abs(cumulative[-1].item() - 1.0) < 1e-5
    assert torch.all(cumulative[1:] >= cumulative[:-1])
    assert cumulative[20] > 0.5  # structured masks: a few components carry most of the variance


def test_identity_codec_is_logit_space_raw_mask():
    codec = MaskCodec.identity(4)
    soft = torch.rand(3, 4, 4) * 0.9 + 0.05
    assert torch.allclose(codec.encode(soft), torch.logit(soft).flatten(1), atol=1e-5)
    assert torch.allclose(codec.decode(codec.encode(soft)), soft, atol=1e-5)


def test_save_load_round_trip_with_metadata(tmp_path):
    codec = fit_pca([random_masks(300, seed=6)], 5, seed=1, source="unit-test", resolution=R)
    path = tmp_path / "pca.pth"
    codec.save(path)
    loaded = MaskCodec.load(path)
    assert torch.equal(loaded.components, codec.components)
    assert loaded.metadata["source"] == "unit-test" and loaded.metadata["count"] == 300
    assert (loaded.metadata["r_min"], loaded.metadata["r_max"]) == (0.01, 0.05)
    assert len(loaded.metadata["explained_variance"]) == 5 and len(loaded.metadata["spectrum_ratio"]) == R * R
    # metadata also travels through a model state dict
    other = MaskCodec.placeholder(5, R)
    other.load_state_dict(codec.state_dict())
    assert other.metadata["source"] == "unit-test"
    assert [p.name for p in tmp_path.iterdir()] == ["pca.pth"]  # no temp file left behind


def test_load_rejects_bad_file(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"components": torch.zeros(2, 4)}, bad)
    with pytest.raises(ValueError, match="missing explained_variance"):
        MaskCodec.load(bad)
    with pytest.raises(ValueError, match="components must be in"):
        fit_pca([random_masks(10)], 0, resolution=R)
