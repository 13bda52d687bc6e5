"""Aggregation and reports rendered from fixture result directories (no training)."""
import math

import pytest

from experiments import aggregate, registry, report
from result_fixtures import FINAL, put_result


def put(root, name, label, scale, seed, metrics):
    """A complete result directory, as a runner would leave it."""
    return put_result(root, name, label, scale, seed, metrics,
                      run={"wall_s": 12.5, "host": "testhost", "cpu": "TestCPU", "cpu_count": 2})


def final(mask_ap, stages=2):
    values = {m: mask_ap + i for i, m in enumerate(FINAL)}
    return {"final": values, "stages": {str(k): {m: v - (stages - k) for m, v in values.items()} for k in range(1, stages + 1)}}


@pytest.fixture
def table1c(tmp_path):
    """L2+dice: 3 seeds (30.0 +- 0.2); L2 clearly below, dice within noise of the default."""
    for seed, value in enumerate([30.0, 30.2, 29.8]):
        put(tmp_path, "table1c", "L2+dice", "tiny", seed, final(value))
    put_result(tmp_path, "table1c", "L2", "tiny", 0, {**final(29.0), "train_time_s": 40.0},  # summed over attempts
               run={"wall_s": 12.5, "host": "testhost", "attempts": [{"wall_s": 30.0, "git_commit": "abc1234"},
                                                                     {"wall_s": 7.5, "status": "failed"},
                                                                     {"status": "running"}]})  # killed: no wall
    put(tmp_path, "table1c", "dice", "tiny", 0, final(30.3))
    return tmp_path


def test_measured_has_the_reference_layout_and_spread(table1c):
    agg = aggregate.collect("table1c", "tiny", table1c)
    reference = registry.get("table1c").reference
    assert agg.mean.index.equals(reference.index) and list(agg.mean.columns) == list(reference.columns)
    assert aggregate.measured("table1c", "tiny", table1c).loc["L2+dice", "mask_AP"] == pytest.approx(30.0)
    assert agg.std.loc["L2+dice", "mask_AP"] == pytest.approx(0.2)
    assert (agg.min.loc["L2+dice", "mask_APs"], agg.max.loc["L2+dice", "mask_APs"]) == pytest.approx((32.8, 33.2))
    assert agg.count.loc["L2+dice", "mask_AP"] == 3 and math.isnan(agg.std.loc["L2", "mask_AP"])
    spread = aggregate.spread("table1c", "tiny", table1c)
    assert spread.loc["L2+dice", ("mask_AP", "std")] == pytest.approx(0.2) and agg.missing == []


def test_pairwise_orderings_reproduced_reversed_within_noise(table1c):
    result = report.ordering(aggregate.collect("table1c", "tiny", table1c), "mask_AP")
    assert result["sigma"] == pytest.approx(0.2) and result["threshold"] == pytest.approx(0.4)
    verdicts = {(p["a"], p["b"]): p["verdict"] for p in result["pairs"]}
    assert verdicts == {("L2+dice", "L2"): "reproduced", ("L2+dice", "dice"): "within noise", ("L2", "dice"): "reversed"}
    assert result["tau"] == pytest.approx(-1 / 3)


def test_report_renders_ours_paper_delta_spread_and_figures(table1c, tmp_path):
    path = report.write_report("table1c", "tiny", table1c, tmp_path / "reports")
    text = path.read_text()
    assert path.name == "table1c-tiny.md"
    assert "| L2+dice | ours | 30.0 ± 0.20 | 31.0 ± 0.20 |" in text
    assert "| | paper | 34.2 | 55.6 | 36.4 | 17.6 | 36.5 | 50.6 |" in text
    assert "| | Δ | -4.2 |" in text
    assert "| L2+dice | 3 | 29.8–30.2 |" in text
    assert "Kendall tau (ours vs paper, 3 rows) = -0.33" in text
    assert "| L2+dice > dice | +1.6 | -0.30 | within noise |" in text and "| L2 > dice | +1.2 | -1.30 | reversed |" in text
    assert "model.head.num_stages: paper 6 -> 2" in text and "TestCPU (2 cores) on testhost" in text
    assert "| L2 | 0 |" in text and "| 12.5 | ≥ 50.0 | 4 | 40.0 | testhost |" in text
    assert "| 12.5 | 12.5 | 1 | — | testhost |" in text and "commit(s) None, abc1234" in text
    for suffix in ("png", "svg"):
        assert (tmp_path / "reports" / "figures" / f"table1c-tiny.{suffix}").stat().st_size > 1000
    assert "![table1c](figures/table1c-tiny.png)" in text


def test_reported_rows_are_marked_and_missing_rows_listed(tmp_path):
    put(tmp_path, "table2", "ISTR R50", "tiny", 0, final(25.0))
    text = report.write_report("table2", "tiny", tmp_path, tmp_path / "rep").read_text()
    assert "| SOLOv2 R50 (reported) | ours | reported |" in text
    assert "| ISTR R50 | ours | 25.0 |" in text and "| n/a | n/a |" in text  # fps comes from the latency entry
    assert "Missing results (planned, not complete): Mask R-CNN R50/seed0, Mask R-CNN R101/seed0, ISTR R101/seed0." in text


def test_figure_reports_from_pca_and_stage_results(tmp_path):
    ratios = [0.5 ** (i + 1) for i in range(784)]
    put(tmp_path, "fig1", "PCA", "tiny", 0, {"explained_variance_ratio": ratios})
    put(tmp_path, "fig3", "ISTR R50", "tiny", 0, final(20.0))
    pca = aggregate.measured("fig1", "tiny", tmp_path)
    assert pca.loc["l=40", "explained_variance"] == pytest.approx(1 - 0.5 ** 40)
    stages = aggregate.measured("fig3", "tiny", tmp_path)
    assert stages.loc["stage 1", "mask_AP"] == 19.0 and stages.loc["stage 2", "box_AP"] == 26.0
    assert math.isnan(stages.loc["stage 3", "mask_AP"])  # the tiny model has 2 stages
    for name in ("fig1", "fig3"):
        text = report.write_report(name, "tiny", tmp_path, tmp_path / "rep").read_text()
        assert "prints no numbers" in " ".join(text.split()) or "without printing numbers" in text
        assert (tmp_path / "rep" / "figures" / f"{name}-tiny.svg").exists()


def test_single_seed_orderings_claim_nothing(tmp_path):
    """One seed per row: no noise band, so no pair may be called reproduced or reversed."""
    root = tmp_path / "results"
    for label, value in [("L2+dice", 30.0), ("L2", 31.0), ("dice", 29.0)]:
        put(root, "table1c", label, "smoke", 0, {"final": {m: value for m in FINAL}})
    agg = aggregate.collect("table1c", "smoke", root, seeds=1)
    verdicts = {(p["a"], p["b"]): p["verdict"] for p in report.ordering(agg, "mask_AP")["pairs"]}
    assert verdicts == {("L2+dice", "L2"): "opposite order, noise unknown",
                        ("L2+dice", "dice"): "same order, noise unknown", ("L2", "dice"): "same order, noise unknown"}


def test_rerendered_figures_are_byte_identical(table1c, tmp_path):
    """Committed figures change only when their content does (no SVG date or random ids)."""
    report.write_report("table1c", "tiny", table1c, tmp_path / "a")
    report.write_report("table1c", "tiny", table1c, tmp_path / "b")
    for suffix in ("png", "svg"):
        first, second = (tmp_path / d / "figures" / f"table1c-tiny.{suffix}" for d in ("a", "b"))
        assert first.read_bytes() == second.read_bytes()


def test_provenance_marks_runs_on_a_cpu_that_emulates_bf16(tmp_path):
    put(tmp_path, "table1d", "dynamic", "tiny", 0, final(30.0))
    put_result(tmp_path, "table1d", "multi-head", "tiny", 0, final(20.0),
               run={"wall_s": 9.0, "host": "zen1", "cpu": "AMD EPYC", "cpu_count": 2, "cpu_native_bf16": False})
    text = report.write_report("table1d", "tiny", tmp_path, tmp_path / "reports").read_text()
    assert "AMD EPYC (2 cores, no native bf16) on zen1" in text and "TestCPU (2 cores) on testhost" in text


def test_bar_figure_draws_error_bars_only_for_rows_with_two_or_more_seeds(tmp_path, monkeypatch):
    """A one-seed row has no std: it gets no error bar (a zero-width one would read as 'no spread')."""
    import numpy as np
    import pandas as pd
    from matplotlib.container import ErrorbarContainer

    from experiments import plots

    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, stem: figures.append(fig) or [])
    rows = ["mask", "l=60"]
    ours = pd.DataFrame({"mask_AP": [7.2, 26.2]}, index=rows)
    std = pd.DataFrame({"mask_AP": [np.nan, 1.5]}, index=rows)
    paper = pd.DataFrame({"mask_AP": [31.6, 34.2]}, index=rows)
    plots.bars(ours, std, paper, ["mask_AP"], [], "Table 1a", tmp_path / "table1a")
    (ax,) = figures[0].axes
    (errorbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    (segment,) = errorbars.lines[2][0].get_segments()  # one vertical segment: the l=60 bar's
    assert segment[:, 0] == pytest.approx([0.8, 0.8])
    assert segment[:, 1] == pytest.approx([24.7, 27.7])


def test_stage_curve_draws_no_error_bars_for_one_seed(tmp_path, monkeypatch):
    """Figure 3 from one seed (std NaN at every stage): the points are drawn, no zero-width error bars."""
    import numpy as np
    import pandas as pd

    from experiments import plots

    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, stem: figures.append(fig) or [])
    stages = ["stage 1", "stage 2"]
    mean = pd.DataFrame({"mask_AP": [2.4, 7.4]}, index=stages)
    plots.stage_curve(mean, pd.DataFrame({"mask_AP": [np.nan, np.nan]}, index=stages), "Figure 3", tmp_path / "fig3")
    (errorbars,) = figures[0].axes[0].containers
    data_line, caps, (bar_lines,) = errorbars.lines
    assert list(data_line.get_ydata()) == pytest.approx([2.4, 7.4])
    assert all(len(segment) == 0 for segment in bar_lines.get_segments())
