"""Mask-representation ceiling: more components never lose AP, the full PCA is limited only by 28x28."""
import pytest

from experiments import mask_ceiling


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ceiling")
    code = mask_ceiling.main(["--scale", "tiny", "--components", "4,16,784", "--out", str(tmp / "ceiling"),
                              f"data.cache_dir={tmp / 'cache'}"])
    return code, (tmp / "ceiling.md").read_text()


def _row(text, components):
    line = next(line for line in text.splitlines() if line.startswith(f"| {components} |"))
    return [float(cell) for cell in line.strip("| ").split(" | ")[:4]]  # components, variance, AP, AP50


def test_ceiling_grows_with_components_and_full_pca_is_resolution_bound(report):
    code, text = report
    assert code == 0
    l4, l16, l784 = _row(text, 4), _row(text, 16), _row(text, 784)
    assert l4[1] < l16[1] < l784[1] == pytest.approx(1.0, abs=1e-3)  # explained variance
    assert l4[2] < l16[2] < l784[2]  # mask AP
    # l=784 reproduces the 28x28 crop exactly; what remains is the 28x28 resampling of the mask
    assert 70.0 < l784[2] < 100.0
    assert l784[3] > 95.0  # AP50: every instance found at IoU 0.5


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert mask_ceiling.main(["--scale", "tiny", "--out", str(tmp_path / "x"), "data.dataset=/nonexistent"]) == 2
    assert "/nonexistent: dataset directory not found" in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()
    with pytest.raises(SystemExit):
        mask_ceiling.main(["--components", "4,x"])
