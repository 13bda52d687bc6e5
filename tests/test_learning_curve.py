"""experiments.learning_curve: a run's learning_curve.jsonl becomes a table, a figure and clear errors."""
from __future__ import annotations

import json

from experiments import learning_curve


def write_curve(run, points):
    run.mkdir(parents=True, exist_ok=True)
    (run / "learning_curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (run / "config.yaml").write_text("solver: {eval_images: 50, eval_period: 100, max_iter: 200, lr: 0.0002}\n")


def point(iteration, seconds, aps):
    return {"iteration": iteration, "train_time_s": seconds,
            "stages": {str(s): {"mask_AP": m, "box_AP": b, "mask_AP50": 0.0} for s, (m, b) in enumerate(aps, 1)}}


def test_curve_table_and_figure(tmp_path, capsys):
    run = tmp_path / "run"
    write_curve(run, [point(200, 180.4, [(3.0, 5.0), (7.25, 9.5)]), point(100, 91.0, [(1.0, 2.0), (1.5, 2.5)])])
    curve = learning_curve.load(run)
    assert list(curve.iteration) == [100, 100, 200, 200] and list(curve.stage) == [1, 2, 1, 2]
    assert curve.loc[3, "mask_AP"] == 7.25
    out = tmp_path / "reports" / "lc"
    assert learning_curve.main([str(run), "--out", str(out)]) == 0
    text = (tmp_path / "reports" / "lc.md").read_text()
    assert "| 100 | 91 | 1.0 | 1.5 | 2.0 | 2.5 |" in text and "| 200 | 180 | 3.0 | 7.2 | 5.0 | 9.5 |" in text
    assert "first 50 val images, measured every 100 iterations of 200" in text
    assert (tmp_path / "reports" / "figures" / "lc.png").stat().st_size > 1000
    assert "![learning curve](figures/lc.png)" in text


def test_missing_or_broken_curve_is_one_line_and_exit_2(tmp_path, capsys):
    assert learning_curve.main([str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no such result directory" in capsys.readouterr().err
    (tmp_path / "untracked").mkdir()
    assert learning_curve.main([str(tmp_path / "untracked")]) == 2
    assert "no learning curve (train with solver.eval_period=N" in capsys.readouterr().err
    run = tmp_path / "run"
    write_curve(run, [point(100, 1.0, [(1.0, 2.0)])])
    with open(run / "learning_curve.jsonl", "a") as handle:
        handle.write('{"iteration": 200}\n')
    assert learning_curve.main([str(run), "--out", str(tmp_path / "r" / "lc")]) == 2
    err = capsys.readouterr().err
    assert "learning_curve.jsonl:2: not a learning-curve point" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()
