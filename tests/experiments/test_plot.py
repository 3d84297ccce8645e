"""The results plot of train.py / eval.py (issue 15 item 11): x labels are the table's
labels, the legend covers no bar, every bar has its value and a 0 stays visible, and the
title says how many samples were evaluated."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from sedma_torch.experiments.compare import (
    metric_figure,
    plot_group,
    plot_metric,
    sample_text,
)


def _row(label, material, correction, top1, n=360):
    return {
        "label": label,
        "material": material,
        "correction": correction,
        "top1": top1,
        "n_samples": n,
    }


def _train_rows():
    rows = [_row("digital", "digital", "-", 0.97)]
    for prefix in ("", "hwa:"):
        for material in ("taox_hfox", "epiram"):
            if prefix and material == "epiram":
                continue
            for mode, value in (("none", 0.0), ("first_order", 0.62), ("first_order+denoise", 0.9)):
                rows.append(_row(f"{prefix}{material}/{mode}", material, mode, value))
    rows.insert(-3, _row("hwa:digital", "digital", "-", 0.95))
    return rows


@pytest.fixture
def figure():
    made = []

    def make(*args, **kwargs):
        fig = metric_figure(*args, **kwargs)
        made.append(fig)
        fig.canvas.draw()
        return fig

    yield make
    for fig in made:
        plt.close(fig)


def test_x_labels_are_the_table_labels_without_the_mode_the_bar_colour_shows(figure):
    rows = _train_rows()
    ax = figure(rows, "top1").axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["taox_hfox", "epiram", "hwa:taox_hfox"]
    for r in rows:
        if r["material"] != "digital":
            assert f"{plot_group(r)}/{r['correction']}" == r["label"]


def test_an_eval_setting_is_labelled_as_in_the_table_not_by_its_material(figure):
    # eval.py rram=open_loop: one setting labelled by its preset, on taox_hfox cells
    rows = [
        {"label": "digital", "material": "digital", "correction": "-", "map": 0.41},
        {"label": "open_loop", "material": "taox_hfox", "correction": "none", "map": 0.12},
    ]
    ax = figure(rows, "map").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["open_loop"]


def test_the_legend_covers_no_bar_and_no_value_label(figure):
    fig = figure(_train_rows(), "top1")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    texts = [t.get_window_extent(renderer) for t in ax.texts]
    assert bars and texts
    assert not any(legend.overlaps(b) for b in bars + texts)


def test_every_bar_has_its_value_and_a_zero_bar_has_a_marker(figure):
    rows = _train_rows()
    ax = figure(rows, "top1").axes[0]
    labels = [t.get_text() for t in ax.texts]
    values = [r["top1"] for r in rows if r["material"] != "digital"]
    assert sorted(labels) == sorted(f"{v:.3f}" for v in values)
    assert "0.000" in labels
    markers = [line for line in ax.lines if line.get_marker() not in (None, "None", "")]
    zeros = [(x, y) for line in markers for x, y in zip(*line.get_data(), strict=True)]
    assert len(zeros) == sum(v == 0 for v in values) == 3
    assert all(y == 0 for _, y in zeros)
    low, _ = ax.get_ylim()
    assert low <= 0.0  # the marker at 0 is inside the axes


def test_title_has_the_sample_count(figure):
    ax = figure(_train_rows(), "top1", title="small_cnn on digits").axes[0]
    assert ax.get_title() == "small_cnn on digits (360 samples)"
    text = sample_text(20, 1300, "images")
    assert text == "20 of 1,300 images" and sample_text(360, 360, "images") == "360 images"
    ax = figure(_train_rows(), "top1", title="EfficientNet", samples=text).axes[0]
    assert ax.get_title() == "EfficientNet (20 of 1,300 images)"


def test_plot_metric_writes_a_png(tmp_path):
    path = plot_metric(_train_rows(), "top1", tmp_path / "r.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
