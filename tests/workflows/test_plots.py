"""The plots are real PNG files with something drawn on them."""

from __future__ import annotations

import json

import pytest

from aligndistil.workflows.plots import method_label, plot_frontier, plot_training_curves, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path, min_bytes=8_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    # something was drawn: many distinct colours, not a blank canvas
    flat = img[..., :3].reshape(-1, 3)
    assert flat.std() > 0.05
    assert len({tuple(p) for p in flat[:: max(1, len(flat) // 20000)].round(2).tolist()}) > 20


def results():
    def m(reward, kl, run=None):
        return {"reward_mean": reward, "reward_ci95": 0.08, "kl_ref": kl, "run": run or {}}

    return {
        "settings": {"reward": "vader"},
        "models": {
            "initial": m(0.3, 0.0),
            "dpo-0.1": m(0.6, 4.0, {"method": "dpo", "beta": 0.1}),
            "dpo-0.2": m(0.5, 2.0, {"method": "dpo", "beta": 0.2}),
            "ad-on": m(0.7, 3.0, {"method": "aligndistil", "mode": "on_policy"}),
            "tdpo2": m(0.55, 1.5, {"method": "tdpo2"}),
        },
    }


def test_frontier_png(tmp_path):
    out = plot_frontier(results(), tmp_path / "sub" / "frontier.png")
    assert out == tmp_path / "sub" / "frontier.png"
    assert_real_png(out)
    assert not list((tmp_path / "sub").glob(".*"))  # no temp file left behind


def test_training_curves_png(tmp_path):
    runs = {}
    for name, key in (("dpo", "rewards/accuracies"), ("aligndistil", "teacher_kl"), ("sft", None)):
        f = tmp_path / name / "metrics.jsonl"
        f.parent.mkdir()
        rows = [{"step": s, "loss": 1.0 / s, **({key: s / 10} if key else {})} for s in range(1, 11)]
        f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
        runs[name] = f
    assert len(read_metrics(runs["dpo"])) == 10  # the malformed line is skipped
    out = plot_training_curves(runs, tmp_path / "curves.png")
    assert_real_png(out)
    with pytest.raises(ValueError, match="no run"):
        plot_training_curves({"x": tmp_path / "missing.jsonl"}, tmp_path / "none.png")


def test_method_labels():
    assert method_label("x", {"method": "dpo", "reverse": True}) == "reverse dpo"
    assert method_label("x", {"method": "aligndistil", "mode": "off_policy"}) == "aligndistil off-policy"
    assert method_label("initial", {}) == "initial"
    assert method_label("t", {"method": "tdpo2"}) == "tdpo2"
