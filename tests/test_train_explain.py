"""Grad-CAM: shape and range, which class and score it explains, the montage, and maps that find lesions."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import write_nifti
from common.errors import UserError
from preprocess.phantoms.synth import make_phantom, write_phantom
from preprocess.reading.transform import preprocess_scan
from train.explain import compute_grad_cam, explanation_title, save_explanation
from train.network.model import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras

SMALL_SHAPE = (32, 32, 16)
# conv4 sees 48 x 48 x 24 as 6 x 6 x 3 cells; at 32 x 32 x 16 (4 x 4 x 2) the map could tell lungs
# from the rest of the chest but not lesions from the rest of the lung
LESION_SHAPE = (48, 48, 24)
HU_WINDOW = (-1000.0, 400.0)
PHANTOM = dict(size=96, slice_range=(16, 24))
# CT-2 lesions cover 25-50% of the lung, ~3% of the volume; ungraded ones ~1.5%, too little for a
# model trained in a minute to tell held-out scans apart reliably
LESION_GRADE = 2
TRAINING_PAIRS = 24
HELD_OUT_SCANS = 12


@pytest.fixture(scope="module")
def untrained_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_model(SMALL_SHAPE, padding="same")


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).uniform(size=SMALL_SHAPE).astype(np.float32)


def test_map_has_the_volume_shape_is_finite_and_in_unit_range(untrained_model, volume):
    heat_map = compute_grad_cam(untrained_model, volume)
    assert heat_map.shape == volume.shape and heat_map.dtype == np.float32
    assert np.isfinite(heat_map).all()
    assert heat_map.min() >= 0 and heat_map.max() == pytest.approx(1.0)
    assert np.array_equal(heat_map, compute_grad_cam(untrained_model, volume))


def test_binary_model_explains_abnormal_unless_asked_for_normal(untrained_model, volume):
    abnormal = compute_grad_cam(untrained_model, volume)
    assert np.array_equal(abnormal, compute_grad_cam(untrained_model, volume, class_index=1))
    assert not np.array_equal(abnormal, compute_grad_cam(untrained_model, volume, class_index=0))
    with pytest.raises(UserError, match="classes 0 .normal. and 1 .abnormal."):
        compute_grad_cam(untrained_model, volume, class_index=2)


def test_map_uses_the_logit_so_a_saturated_sigmoid_still_explains(volume):
    keras.utils.set_random_seed(0)
    model = build_model(SMALL_SHAPE, padding="same")
    before = compute_grad_cam(model, volume)
    output = model.get_layer("probability_abnormal")
    output.bias.assign(output.bias + 60.0)  # sigmoid(60) is 1.0 in float32: its gradient is exactly 0
    assert float(model.predict(volume[None, ..., None], verbose=0)[0, 0]) == 1.0
    assert before.max() == pytest.approx(1.0)
    np.testing.assert_allclose(compute_grad_cam(model, volume), before, atol=1e-5)


def test_softmax_model_explains_its_predicted_class_by_default(volume):
    keras.utils.set_random_seed(1)
    trunk = build_model(SMALL_SHAPE, padding="same")
    grades = keras.layers.Dense(3, activation="softmax", name="probability_grade")(trunk.get_layer("dropout").output)
    model = keras.Model(trunk.inputs, grades)
    predicted = int(np.argmax(model.predict(volume[None, ..., None], verbose=0)[0]))
    heat_map = compute_grad_cam(model, volume)
    assert np.array_equal(heat_map, compute_grad_cam(model, volume, class_index=predicted))
    assert not np.array_equal(heat_map, compute_grad_cam(model, volume, class_index=(predicted + 1) % 3))
    with pytest.raises(UserError, match="class index 3 is out of range"):
        compute_grad_cam(model, volume, class_index=3)


def test_a_volume_of_another_shape_is_one_line_user_error(untrained_model):
    with pytest.raises(UserError, match="the volume is 32x32x8 but the model takes 32x32x16 volumes"):
        compute_grad_cam(untrained_model, np.zeros((32, 32, 8), dtype=np.float32))


def test_explanation_is_a_png_montage_written_atomically(untrained_model, volume, tmp_path):
    heat_map = compute_grad_cam(untrained_model, volume)
    path = save_explanation(volume, heat_map, tmp_path / "explained.png", "study_0001 (abnormal)")
    assert path == tmp_path / "explained.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    height, width, channels = plt.imread(path).shape
    assert height > 100 and width > 100 and channels in (3, 4)
    assert [entry.name for entry in tmp_path.iterdir()] == ["explained.png"]  # no temporary left over
    with pytest.raises(ValueError, match="differ in shape"):
        save_explanation(volume, heat_map[:, :, :8], tmp_path / "bad.png", "bad")


def test_the_title_says_the_volume_is_the_lungs_box_in_the_scans_voxels(tmp_path):
    phantom = make_phantom(0, 0, True, **PHANTOM)
    path = tmp_path / "study_0000.nii.gz"
    write_phantom(phantom, path)
    _, info = preprocess_scan(path, SMALL_SHAPE, *HU_WINDOW, crop="lungs")
    x0, x1, y0, y1, z0, z1 = info.stats.lung_box
    assert (x1 - x0, y1 - y0) != (96, 96), "the box is smaller than the scan"
    title = explanation_title("study_0000.nii.gz", "abnormal", "abnormal", 97.1234, "lungs", info.stats)
    heading, region = title.split("\n")
    assert heading == "study_0000.nii.gz: Grad-CAM for 'abnormal' (predicted abnormal, 97.1%)"
    assert region == (f"volume: the lungs' box, voxels {x0}-{x1} left-right, {y0}-{y1} front-back, {z0}-{z1} "
                      f"head-foot of the scan's {' x '.join(map(str, phantom.hu.shape))} (RAS)")


def test_the_title_says_the_volume_is_the_whole_scan_without_the_lung_crop(tmp_path):
    path = tmp_path / "study_0000.nii.gz"
    write_phantom(make_phantom(0, 0, False, **PHANTOM), path)
    _, info = preprocess_scan(path, SMALL_SHAPE, *HU_WINDOW, crop="none")
    assert info.stats.lung_box is not None  # the lungs are found either way; the volume is not cut to them
    title = explanation_title("study_0000.nii.gz", "normal", "normal", 60.0, "none", info.stats)
    assert title.endswith("\nvolume: the whole scan (no lung crop)") and "box" not in title


def cache_space_phantom(seed: int, study_number: int, abnormal: bool, folder: Path,
                        shape: tuple[int, int, int] = LESION_SHAPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom as the cache holds it, with its lesion and lung masks resampled the same way."""
    phantom = make_phantom(seed, study_number, abnormal, **PHANTOM, grade=LESION_GRADE if abnormal else None)
    name = f"{seed}-{study_number}-{int(abnormal)}"
    write_phantom(phantom, folder / f"{name}.nii.gz")
    volume, _ = preprocess_scan(folder / f"{name}.nii.gz", shape, *HU_WINDOW)
    masks = []
    for kind, mask in (("lesion", phantom.lesion_mask), ("lung", phantom.lung_mask)):
        # a mask at the window's ends becomes, after preprocessing, the share of each voxel it covers
        hu = np.where(mask, HU_WINDOW[1], HU_WINDOW[0]).astype(np.int16)
        share, _ = preprocess_scan(write_nifti(folder / f"{name}-{kind}.nii.gz", hu, phantom.affine), shape, *HU_WINDOW)
        masks.append(share >= 0.5)
    return volume, masks[0], masks[1]


def train_lesion_model(folder: Path, seed: int = 0) -> tuple[keras.Model, float]:
    """The tutorial's network trained on normal/abnormal pairs of the same anatomy (only lesions tell them
    apart), and its accuracy on those pairs in inference mode."""
    volumes = [cache_space_phantom(seed, number, abnormal, folder)[0]
               for number in range(TRAINING_PAIRS) for abnormal in (False, True)]
    inputs, labels = np.stack(volumes)[..., None], np.tile([0.0, 1.0], TRAINING_PAIRS)
    keras.utils.set_random_seed(seed)
    model = build_model(LESION_SHAPE, padding="same")
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            # the default 0.99 leaves the moving variance near its initial 1 after 180 steps, while the
            # real variances are ~1e-3: inference would call every scan abnormal
            layer.momentum = 0.9
    model.compile(optimizer=keras.optimizers.Adam(3e-4), loss="binary_crossentropy")
    model.fit(inputs, labels, batch_size=4, epochs=15, shuffle=True, verbose=0)
    return model, float(np.mean((model.predict(inputs, verbose=0)[:, 0] > 0.5) == labels))


@pytest.mark.slow
def test_map_weighs_lesions_more_than_the_rest_of_the_lung(tmp_path):
    model, training_accuracy = train_lesion_model(tmp_path)
    assert training_accuracy == 1.0  # the model separates its training phantoms in inference mode
    inside, outside_in_lung, outside_anywhere = [], [], []
    for number in range(HELD_OUT_SCANS):  # another seed: anatomy and lesions the model never saw
        volume, lesion, lung = cache_space_phantom(1, number, True, tmp_path)
        heat_map = compute_grad_cam(model, volume)
        inside.append(heat_map[lesion].mean())
        outside_in_lung.append(heat_map[lung & ~lesion].mean())
        outside_anywhere.append(heat_map[~lesion].mean())
    inside, outside_in_lung = np.array(inside), np.array(outside_in_lung)
    # measured: 0.380 inside against 0.322 in the rest of the lung and 0.131 anywhere else; 11 of 12 scans.
    # An untrained model or one fitted to shuffled labels puts less weight inside than outside.
    assert inside.mean() > 1.1 * outside_in_lung.mean()
    assert np.count_nonzero(inside > outside_in_lung) >= 9
    assert inside.mean() > 2 * np.mean(outside_anywhere)


# -- predict --explain ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_epoch_run(tiny_cache, tmp_path_factory) -> Path:
    from train.fit import fit_model
    from train.options import FitOptions

    run_dir = tmp_path_factory.mktemp("explain-run") / "run"
    fit_model(FitOptions(cache=tiny_cache, run_dir=run_dir, epochs=1, padding="same", quiet=True))
    return run_dir


def test_predict_explain_writes_one_montage_per_scan(one_epoch_run, synthetic_raw, tmp_path, capsys):
    from train.__main__ import main

    scans = sorted(synthetic_raw.rglob("*.nii.gz"))[:2]
    out = tmp_path / "explanations"
    assert main(["predict", str(one_epoch_run), *map(str, scans), "--explain", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    written = sorted(out.iterdir())
    assert [path.name for path in written] == sorted(f"{scan.name.removesuffix('.nii.gz')}_gradcam.png"
                                                      for scan in scans)
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    for line, scan in zip(lines, scans):
        assert line.startswith(f"{scan}: This model is ") and line.endswith(
            f"[Grad-CAM: {out / (scan.name.removesuffix('.nii.gz') + '_gradcam.png')}]")


def test_predict_explain_keeps_a_montage_for_each_of_two_scans_with_one_name(one_epoch_run, synthetic_raw,
                                                                             tmp_path, capsys):
    from train.__main__ import main

    source = sorted(synthetic_raw.rglob("*.nii.gz"))[0]
    scans = [tmp_path / site / "ct.nii.gz" for site in ("site-a", "site-b")]
    for scan in scans:
        scan.parent.mkdir()
        scan.write_bytes(source.read_bytes())
    out = tmp_path / "explanations"
    assert main(["predict", str(one_epoch_run), *map(str, scans), "--explain", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(path.name for path in out.iterdir()) == ["ct-2_gradcam.png", "ct_gradcam.png"]
    assert lines[0].endswith(f"[Grad-CAM: {out / 'ct_gradcam.png'}]")
    assert lines[1].endswith(f"[Grad-CAM: {out / 'ct-2_gradcam.png'}]")


def test_predict_explain_into_a_file_is_one_line(one_epoch_run, synthetic_raw, tmp_path, capsys):
    from train.__main__ import main

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    scan = sorted(synthetic_raw.rglob("*.nii.gz"))[0]
    assert main(["predict", str(one_epoch_run), str(scan), "--explain", str(blocker)]) == 1
    assert capsys.readouterr().err.strip() == f"python -m train: error: --explain {blocker} is a file, not a folder"


def test_predict_explain_titles_each_montage_with_the_runs_crop_and_the_scans_box(one_epoch_run, synthetic_raw,
                                                                                 tmp_path, monkeypatch, capsys):
    import train.explain
    from train.__main__ import main

    titles, save = [], train.explain.save_explanation

    def save_and_keep_title(volume, heat_map, path, title):
        titles.append(title)
        return save(volume, heat_map, path, title)

    monkeypatch.setattr(train.explain, "save_explanation", save_and_keep_title)
    scan = sorted(synthetic_raw.rglob("*.nii.gz"))[0]
    assert main(["predict", str(one_epoch_run), str(scan), "--explain", str(tmp_path / "out")]) == 0
    _, info = preprocess_scan(scan, SMALL_SHAPE, *HU_WINDOW, crop="lungs")  # the tiny cache's crop
    [title] = titles
    assert title.startswith(f"{scan.name}: Grad-CAM for 'abnormal'")
    assert title.endswith("\n" + train.explain.describe_region("lungs", info.stats)) and "lungs' box" in title
