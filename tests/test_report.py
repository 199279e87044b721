"""Results a person can read: after validate/test each task leaves per_class.csv, pictures and report.html;
`resnet-tasks report` puts runs side by side; the page escapes what comes from the data and renders in a real
browser (headless Chromium) with every image loaded; `--model.log_images` writes TensorBoard images."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import COMMON_TRAINER_ARGS, printed_path

EVIL = "<img src=x onerror=alert(1)>"
TASKS = {"classification": "imagefolder", "detection": "coco", "segmentation": "voc"}
PICTURES = {
    "classification": {"confusion_matrix.png", "per_class.png", "gallery.jpg"},
    "detection": {"pr_curve.png", "confusion_matrix.png", "per_class.png", "gallery.jpg"},
    "segmentation": {"confusion_matrix.png", "per_class.png", "gallery.jpg"},
}
PER_CLASS_KEY = {"classification": "acc", "detection": "ap", "segmentation": "iou"}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from resnet_tasks.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes"), num_train=8, num_val=6, image_size=64)


@pytest.fixture(scope="module")
def runs(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Each quickstart config trained 2 steps, then its checkpoint evaluated once through the CLI (the pictures need
    no accuracy): test for classification and segmentation, validate with --model.log_images 2 for detection.
    {task: (run dir, out)}."""
    import contextlib
    import io

    from resnet_tasks.cli import main

    folder = tmp_path_factory.mktemp("runs")
    result = {}
    for task, layout in TASKS.items():
        command = "validate" if task == "detection" else "test"
        extra = ["--model.log_images", "2"] if task == "detection" else []
        data = ["--config", f"configs/quickstart/{task}.yaml", "--data.root", str(shapes / layout),
                "--data.batch_size", "4", "--data.num_workers", "0", *COMMON_TRAINER_ARGS]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            main(["fit", *data, "--trainer.max_steps", "2", "--trainer.max_epochs", "-1", "--trainer.max_time", "null",
                  "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                  "--trainer.default_root_dir", str(folder / f"{task}_fit")])  # fmt: skip
        (checkpoint,) = (folder / f"{task}_fit").glob("lightning_logs/version_0/checkpoints/last.ckpt")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main([command, *data, "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(folder / task),
                  *extra])  # fmt: skip
        page = printed_path(out.getvalue(), "report written: ")
        result[task] = (page.parent, out.getvalue())
    return result


def _per_class(run: Path) -> list[dict[str, str]]:
    with open(run / "per_class.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("task", list(TASKS))
def test_evaluation_leaves_per_class_table_pictures_and_page(task: str, runs: dict, shapes: Path) -> None:
    run, out = runs[task]
    assert (run / "report.html").is_file() and (run / "metrics.json").is_file()
    assert PICTURES[task] <= {p.name for p in run.iterdir()}, sorted(p.name for p in run.iterdir())
    for name in PICTURES[task]:
        with Image.open(run / name) as picture:
            assert picture.width > 200 and picture.height > 100
    metrics = json.loads((run / "metrics.json").read_text())
    rows = _per_class(run)
    key = PER_CLASS_KEY[task]
    # metrics.json holds the defined per-class values of per_class.csv (one source, float32 through the logger).
    for row in rows:
        if row[key]:
            assert metrics[f"{key}/{row['class']}"] == pytest.approx(float(row[key]), abs=1e-6)
        else:
            assert f"{key}/{row['class']}" not in metrics
    html = (run / "report.html").read_text()
    for row in rows:
        assert row["class"] in html
    # The confusion matrices count every labelled sample / pixel / object once.
    if task == "classification":
        assert [row["class"] for row in rows] == ["circle", "square", "triangle"]
        images = list((shapes / "imagefolder" / "val").glob("*/*.jpg"))
        assert sum(float(row["support"]) for row in rows) == len(images)
        top1 = sum(float(row["acc"]) * float(row["support"]) for row in rows if row["acc"]) / len(images)
        assert top1 == pytest.approx(metrics["top1"], abs=1e-6)
    elif task == "segmentation":
        masks = (shapes / "voc/VOCdevkit/VOC2012/SegmentationClass").glob("*.png")
        stems = set((shapes / "voc/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split())
        labelled = sum(int((np.asarray(Image.open(m)) != 255).sum()) for m in masks if m.stem in stems)
        assert sum(float(row["pixels"]) for row in rows) == labelled
        assert rows[0]["class"] == "background"
    else:
        annotations = json.loads((shapes / "coco/annotations/instances_val2017.json").read_text())
        objects = [a for a in annotations["annotations"] if not a.get("iscrowd")]
        assert sum(float(row["objects"]) for row in rows) == len(objects)
        defined = [float(row["ap"]) for row in rows if row["ap"]]
        assert np.mean(defined) == pytest.approx(metrics["map"], abs=1e-6)
        assert {f"ap50/{row['class']}" for row in rows if row["ap50"]} <= set(metrics)


def test_log_images_writes_gallery_and_curves_to_tensorboard(runs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = runs["detection"]
    (events,) = (run.parents[1] / "tensorboard").glob("version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    assert {"val/gallery", "val/confusion_matrix", "val/pr_curve"} <= set(accumulator.Tags()["images"])
    # Two images side by side (truth | prediction pairs), one row of two pairs.
    gallery = accumulator.Images("val/gallery")[-1]
    assert gallery.width > 2 * 256 * 2 - 1 and gallery.height < 400
    # Per-class entries go to metrics.json, not to the loggers.
    assert not any(tag.startswith("val/ap/") for tag in accumulator.Tags()["scalars"])


def test_report_command_puts_runs_side_by_side(runs: dict, run_cli, tmp_path: Path) -> None:
    folders = [runs[task][0] for task in TASKS]
    code, out, err = run_cli("report", *folders, "--out", tmp_path / "all.html")
    assert code == 0, err
    page = printed_path(out, "report written: ")
    html = page.read_text()
    for folder in folders:
        for name in PICTURES["detection"] & {p.name for p in folder.iterdir()}:
            assert os.path.relpath(folder / name, tmp_path) in html
    # One metrics table with a column per run.
    assert html.count("<th>metric</th>") == 1 and "map_50" in html and "top1" in html and "miou" in html
    # A run folder without metrics.json: one clear error.
    code, out, err = run_cli("report", tmp_path / "nothing")
    assert code == 2 and "No metrics.json under" in err and "Traceback" not in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{")
    code, out, err = run_cli("report", tmp_path / "broken")
    assert code == 2 and "metrics.json is not valid JSON" in err and "Traceback" not in err


def evil_run(folder: Path) -> Path:
    """A finished run whose class names, metric names and config values carry HTML."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"map": 0.5, f"ap/{EVIL}": 0.25, EVIL: 1.0}))
    with open(folder / "per_class.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "ap", "ap50"])
        writer.writerow([EVIL, "0.25", "0.5"])
        writer.writerow(["</table><script>alert(2)</script>", "0.5", ""])
    (folder / "config.yaml").write_text(f"data:\n  root: '{EVIL}'\n")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "gallery.jpg")
    return folder


def test_report_escapes_everything_from_the_data(tmp_path: Path) -> None:
    from resnet_tasks.report.run import main

    run = evil_run(tmp_path / f"run {EVIL}"[:60].replace("/", "_"))
    main([str(run)])
    html = (run / "report.html").read_text()
    assert EVIL not in html and "<script>alert(2)" not in html and "onerror=alert(1)>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert (run / "per_class.png").is_file()  # drawn from per_class.csv for a finished run


def chromium() -> str | None:
    """The headless Chromium binary (Debian's chromium-headless-shell, or chromium)."""
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


IMAGE_CHECK = """<script>
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  var out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = 'images=' + images.length + ' broken=' + broken.map(function (i) { return i.src; }).join(',');
  document.body.appendChild(out);
});
</script>"""


def browser_dom(page: Path) -> str:
    """The page's DOM after load, as headless Chromium sees it, with a probe reporting every image's state.

    The probe runs on a copy of the page beside it (same relative image links); the report itself has no script.
    """
    binary = chromium()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("headless Chromium is missing: .ci/run installs chromium-headless-shell")
        pytest.skip("no Chromium binary (apt-get install chromium-headless-shell)")
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", IMAGE_CHECK + "</body>"))
    result = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_report_renders_in_headless_chromium_with_every_image_loaded(runs: dict, tmp_path: Path) -> None:
    from resnet_tasks.report.run import main

    main([str(runs[task][0]) for task in TASKS] + ["--out", str(tmp_path / "side_by_side.html")])
    pages = [runs[task][0] / "report.html" for task in TASKS] + [tmp_path / "side_by_side.html"]
    for page in pages:
        dom = browser_dom(page)
        check = dom.split('<pre id="image-check">', 1)[1].split("</pre>", 1)[0]
        count = int(check.split("images=", 1)[1].split()[0])
        assert count >= 3 and check.endswith("broken="), check
    # The evil names arrive as text: no image element with src "x" exists, the name is readable on the page.
    run = evil_run(tmp_path / "evil")
    main([str(run)])
    dom = browser_dom(run / "report.html")
    check = dom.split('<pre id="image-check">', 1)[1].split("</pre>", 1)[0]
    assert check == "images=2 broken=", check  # gallery.jpg and per_class.png: the names made no <img>
    assert "&lt;img src=x onerror=alert(1)&gt;" in dom


def test_readme_shows_one_picture_of_each_kind() -> None:
    import re

    repo = Path(__file__).resolve().parents[1]
    links = re.findall(r"!\[[^\]]*\]\((docs/report/[^)]+)\)", (repo / "README.md").read_text())
    assert {Path(link).name for link in links} >= {"pr_curve.png", "confusion_matrix.png", "per_class.png",
                                                   "gallery.jpg", "training_curves.png"}  # fmt: skip
    for link in links:
        with Image.open(repo / link) as picture:
            assert picture.width >= 400 and (repo / link).stat().st_size < 300_000, link


def test_one_colour_rule_for_boxes_and_masks() -> None:
    """Boxes take their class label's colour; masks blend the VOC palette colour in, ignored pixels as asked."""
    from resnet_tasks.data.masks import VOC_PALETTE
    from resnet_tasks.evaluation.gallery import GalleryItem
    from resnet_tasks.report.drawing import BOX_COLOURS, box_colour, mask_colour, overlay_mask
    from resnet_tasks.report.gallery import class_colours

    assert box_colour(1) == BOX_COLOURS[0] and box_colour(len(BOX_COLOURS) + 1) == BOX_COLOURS[0]
    assert mask_colour(1) == tuple(VOC_PALETTE[3:6])
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    drawn = overlay_mask(image, mask, alpha=0.5, ignore_colour=(255, 255, 255))
    assert drawn[0, 0].tolist() == [100, 100, 100] and drawn[1, 0].tolist() == [255, 255, 255]
    assert drawn[0, 1].tolist() == [round(0.5 * 100 + 0.5 * c) for c in mask_colour(1)]
    assert overlay_mask(image, mask)[1, 0].tolist() == [100, 100, 100]
    item = GalleryItem(title="x", image=image, mask_names=["background", "cat", "dog"])
    assert class_colours([item]) == {"cat": box_colour(1), "dog": box_colour(2)}
