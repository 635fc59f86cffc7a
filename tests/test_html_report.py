"""report.html: self-contained (every image embedded, no script, no outside resource), the
tables, curves and grids it promises, and rendered by headless Chromium without an error.

Chromium comes from Debian's ``chromium-headless-shell`` package (CI installs it); where it is
missing the rendering tests skip, unless ``SNL_REQUIRE_CHROMIUM=1`` makes that a failure.
"""

from __future__ import annotations

import html.parser
import io
import json
import os

import numpy as np
import pytest
from browser import find_chromium, render
from PIL import Image

from snl import html_report, metrics

REQUIRE = os.environ.get("SNL_REQUIRE_CHROMIUM") == "1"


def chromium_or_skip() -> None:
    if find_chromium() is None:
        message = ("no headless Chromium (apt-get install chromium-headless-shell, or set "
                   "SNL_CHROMIUM)")
        if REQUIRE:
            pytest.fail(message + "; SNL_REQUIRE_CHROMIUM=1")
        pytest.skip(message)


class _Collect(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(path) -> list[tuple[str, dict]]:
    collector = _Collect()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector.tags


def embedded_images(tags) -> list[Image.Image]:
    """Every <img>'s picture; fails on any source that is not an embedded PNG."""
    images = []
    for tag, attrs in tags:
        if tag == "img":
            src = attrs["src"]
            assert src.startswith("data:image/png;base64,"), src[:60]
            import base64

            images.append(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    return images


def assert_self_contained(path, links_allowed: bool = False) -> list[Image.Image]:
    tags = parse(path)
    names = {tag for tag, _ in tags}
    assert not names & {"script", "link", "iframe", "object", "embed"}
    for tag, attrs in tags:
        for key in ("src", "href"):
            value = attrs.get(key)
            if value is None or value.startswith("data:"):
                continue
            assert links_allowed, (tag, value)
            assert tag == "a", (tag, value)
            assert "://" not in value, (tag, value)
    return embedded_images(tags)


def assert_renders(path, n_images: int) -> None:
    """Chromium opens the page: no console error or failed load, every image decoded, and
    a screenshot that is a real picture."""
    chromium_or_skip()
    page = render(path)
    assert page.errors == []
    assert len(page.images) == n_images
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in page.images)
    shot = Image.open(io.BytesIO(page.screenshot)).convert("L")
    assert shot.width >= 1000
    assert shot.height >= 600
    assert np.asarray(shot).std() > 10  # not a blank page


def _rows(rng, n=4, with_masks=True):
    rows = []
    for i in range(n):
        mask = np.zeros((64, 64), np.uint8)
        mask[10:20, 30:40] = i % 2
        rows.append(html_report.GridRow(
            name=f"{i:03d}.png", group="highest-scored defect", defect="hole" if i % 2 else "good",
            score=float(i), image=rng.integers(0, 255, (100, 100, 3), dtype=np.uint8),
            amap=rng.random((64, 64)).astype(np.float32),
            mask=mask if with_masks else None, label=i % 2 if with_masks else None))
    return rows


def test_grid_images_are_embedded_and_at_least_256_px(tmp_path):
    rng = np.random.default_rng(0)
    rows = _rows(rng)
    body = html_report.grid(rows, 0.0, 1.0, threshold=1.5)
    path = html_report.write(tmp_path / "g.html", html_report.page("grid", [body]))
    images = assert_self_contained(path)
    # Per row: original, map, its colour bar, overlay, ground truth.
    assert len(images) == 5 * len(rows)
    big = [im for im in images if im.width >= 256]
    assert len(big) == 4 * len(rows)
    assert all(im.height == 256 for im in big)
    text = path.read_text()
    assert text.count("<tr>") == len(rows) + 1
    assert "ground truth" in text
    # Verdicts at the threshold 1.5: rows 0, 1 normal, 2, 3 anomalous; labels 0, 1, 0, 1.
    assert text.count("(correct)") == 2
    assert text.count("(wrong)") == 2
    # Without masks the ground-truth column goes.
    body = html_report.grid(_rows(rng, with_masks=False), 0.0, 1.0)
    assert "ground truth" not in body
    assert "verdict" not in body


def test_pick_rows_shows_top_defects_then_misses_without_repeats():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.7, 0.3])
    labels = np.array([1, 1, 1, 0, 0, 0, 1])
    picked = html_report.pick_rows(scores, labels, per_group=2)
    assert picked == [(0, "highest-scored defect"), (2, "highest-scored defect"),
                      (1, "lowest-scored defect"), (6, "lowest-scored defect"),
                      (3, "highest-scored good image"), (5, "highest-scored good image")]
    # Fewer images than groups: each shown once.
    picked = html_report.pick_rows(np.array([0.3, 0.6]), np.array([1, 0]))
    assert sorted(i for i, _ in picked) == [0, 1]


def test_pro_curve_is_the_curve_under_aupro():
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 32, 32))
    masks[3:, 5:12, 5:15] = 1
    masks[4, 20:25, 20:30] = 1
    maps = rng.random((6, 32, 32)).astype(np.float32) + 0.4 * masks
    for limit in (0.05, 0.3, 1.0):
        x, y = metrics.pro_curve(maps, masks, limit, points=None)
        assert (x[0], y[0]) == (0.0, 0.0)
        assert x[-1] == pytest.approx(limit)
        assert np.all(np.diff(x) >= 0)
        assert np.all(np.diff(y) >= -1e-12)
        area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2)) / limit
        assert area == pytest.approx(metrics.aupro(maps, masks, limit), abs=1e-12)
        gx, gy = metrics.pro_curve(maps, masks, limit, points=200)
        assert gx.size == 200
        assert float(np.sum(np.diff(gx) * (gy[1:] + gy[:-1]) / 2)) / limit == pytest.approx(
            area, abs=5e-3)
    with pytest.raises(ValueError, match="points must be at least 2"):
        metrics.pro_curve(maps, masks, points=1)
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        metrics.pro_curve(maps, masks, 0.0)


def test_synthetic_page_renders_in_chromium(tmp_path):
    rng = np.random.default_rng(2)
    curve = (np.linspace(0, 1, 20), np.linspace(0, 1, 20) ** 0.5)
    sections = [
        html_report.section("Per class", html_report.metrics_table(
            {"a": {"image_auroc": 0.9, "aupro": float("nan")}, "mean": {"image_auroc": 0.9}})),
        html_report.img_tag(html_report.curves_png({"a": curve}, "ROC", "x", "y"), "roc"),
        html_report.grid(_rows(rng), 0.0, 1.0, threshold=1.0),
    ]
    path = html_report.write(tmp_path / "report.html",
                             html_report.page("synthetic", sections, {"k": 1}))
    images = assert_self_contained(path)
    assert_renders(path, len(images))


def test_a_page_with_a_broken_image_fails_the_rendering_check(tmp_path):
    # The check can fail: a missing file is a failed load.
    chromium_or_skip()
    path = tmp_path / "broken.html"
    path.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>b</title></head>'
                    '<body><img src="missing.png" alt="x"></body></html>')
    page = render(path)
    assert page.errors
    assert page.images[0]["width"] == 0


# ----------------------------------------------------------------------- from real runs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from support import require_model_extra

    require_model_extra()
    from snl import cli
    from snl.data import make_default_dataset

    root = tmp_path_factory.mktemp("html")
    data = root / "textures"
    make_default_dataset(data, seed=0, size=64, n_train=4, n_test_good=3, n_test_defect=2,
                         classes=["brick", "grass"])
    config = cli.TrainConfig(data=str(data), backbone="tf_efficientnet_lite0", image_size=64,
                             epochs=1, batch_size=4, device="cpu", num_centers=4)
    cli.train(config, root / "run")
    return root


def test_training_run_writes_report_html(run):
    folder = run / "run"
    path = folder / "report.html"
    images = assert_self_contained(path)
    text = path.read_text()
    for heading in ("Per class", "Per defect type", "Curves", "Class brick", "Class grass"):
        assert f">{heading}</h" in text, heading
    table = json.loads((folder / "metrics.json").read_text())
    assert f"{100 * table['mean']['image_auroc']:.1f}" in text
    assert "image-level ROC curves" in text
    assert "PRO curves" in text
    # Each class: 2 highest-scored defects, 2 lowest-scored, 2 highest-scored good images.
    for group in ("highest-scored defect", "lowest-scored defect", "highest-scored good image"):
        assert text.count(f"<b>{group}</b>") == 4, group
    assert sum(im.size == (256, 256) for im in images) == 4 * 12  # 4 pictures a row, 12 rows
    curves = json.loads((folder / "curves.json").read_text())
    assert set(curves["roc"]) == set(curves["pro"]) == {"brick", "grass"}
    assert_renders(path, len(images))


def test_eval_and_predict_write_report_html(run, tmp_path):
    from snl import cli

    ckpt = run / "run" / "checkpoints" / "last.pt"
    assert cli.main(["eval", str(ckpt), "--data", str(run / "textures"), "--out",
                     str(tmp_path / "ev"), "--device", "cpu"]) == 0
    images = assert_self_contained(tmp_path / "ev" / "report.html")
    assert_renders(tmp_path / "ev" / "report.html", len(images))

    files = sorted((run / "textures" / "brick" / "test").glob("*/*.png"))[:3]
    assert cli.main(["predict", str(ckpt), *map(str, files), "--out", str(tmp_path / "pred"),
                     "--device", "cpu"]) == 0
    path = tmp_path / "pred" / "report.html"
    images = assert_self_contained(path)
    text = path.read_text()
    scores = json.loads((tmp_path / "pred" / "scores.json").read_text())
    for result in scores:
        assert result["path"] in text
        assert f"{result['score']:.4g}" in text
    assert text.count("<b>rank ") == 3
    assert sum(im.size == (256, 256) for im in images) == 3 * 3  # no ground truth column
    assert_renders(path, len(images))
