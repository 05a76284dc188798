"""The training recipe: PreciseBN, recipes and their flags, --precision auto, the schedule, ROC curves."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras model.save

import keras  # noqa: E402

from common.errors import UserError  # noqa: E402
from preprocess.cache import CacheReader  # noqa: E402
from train.evaluate import predict_split  # noqa: E402
from train.fit import fit_model  # noqa: E402
from train.network.architecture import Architecture  # noqa: E402
from train.network.model import build_model  # noqa: E402
from train.network.scores import compute_roc_auc, compute_roc_curve  # noqa: E402
from train.options import RECIPES, FitOptions, changed_options, check_fit_options, resolve_recipe  # noqa: E402
from train.rundir.models import load_trained_model  # noqa: E402
from train.loop.precise_bn import (  # noqa: E402
    assign_population_statistics, batchnorm_layers, estimate_population_statistics, precise_bn_rows,
)
from train.loop.loop import make_precise_bn_batches, make_schedule  # noqa: E402
from train.hardware import cpu_flags  # noqa: E402
from train.network.precision import auto_precision, resolve_precision, this_machine  # noqa: E402
from train.rundir.layout import model_path, read_history, read_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "tutorial_recipe_history.json"
SMALL = Architecture(block_filters=(4, 8, 8), dense_units=8)


def reference_population_statistics(model: keras.Model, batches: list[np.ndarray]) -> list[tuple]:
    """PreciseBN by its definition, through Keras's own training-mode BatchNorm: for each batch, every
    BatchNorm's input with the earlier ones normalizing by batch statistics; then the mean over the
    batches of the per-channel batch means and (biased) batch variances."""
    norms = batchnorm_layers(model)
    probe = keras.Model(model.input, [layer.input for layer in norms])
    means, variances = [[] for _ in norms], [[] for _ in norms]
    for volumes in batches:
        for index, inputs in enumerate(probe(volumes, training=True)):  # also moves the moving averages
            values = np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1])
            means[index].append(values.mean(axis=0))
            variances[index].append(values.var(axis=0))
    return [(np.mean(mean, axis=0), np.mean(variance, axis=0)) for mean, variance in zip(means, variances)]


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_precise_bn_sets_the_population_statistics_of_the_batches(precision):
    keras.utils.set_random_seed(3)
    model = build_model((16, 16, 8), padding="same", precision=precision, architecture=SMALL)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 1, (2, 16, 16, 8, 1)).astype(np.float32) * scale for scale in (1.0, 0.5, 2.0)]
    # train a step so that gamma and beta are not 1 and 0 and the weights differ from their initial values
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    model.train_on_batch(batches[0], np.array([0.0, 1.0], np.float32))
    expected = reference_population_statistics(model, batches)
    before = [np.array(layer.moving_mean) for layer in batchnorm_layers(model)]
    assign_population_statistics(model, estimate_population_statistics(model, batches))
    tolerance = {"float32": 1e-4, "mixed_bfloat16": 5e-2}[precision]  # bfloat16: 8 bits of mantissa
    for layer, (mean, variance), old_mean in zip(batchnorm_layers(model), expected, before):
        assert not np.allclose(np.array(layer.moving_mean), old_mean)
        np.testing.assert_allclose(np.array(layer.moving_mean), mean, rtol=tolerance, atol=tolerance * 1e-2)
        np.testing.assert_allclose(np.array(layer.moving_variance), variance, rtol=tolerance, atol=tolerance * 1e-2)


def test_precise_bn_changes_no_weight_and_is_repeatable():
    keras.utils.set_random_seed(4)
    model = build_model((16, 16, 8), padding="same", architecture=SMALL)
    batches = [np.random.default_rng(seed).uniform(0, 1, (2, 16, 16, 8, 1)).astype(np.float32) for seed in (1, 2)]
    weights = [np.array(weight) for weight in model.trainable_weights]
    first = estimate_population_statistics(model, batches)
    second = estimate_population_statistics(model, batches)
    for (mean, variance), (mean_again, variance_again) in zip(first, second):
        assert np.array_equal(mean, mean_again) and np.array_equal(variance, variance_again)
    assign_population_statistics(model, first)
    assert all(np.array_equal(np.array(weight), old) for weight, old in zip(model.trainable_weights, weights))


def test_precise_bn_reads_whole_batches_of_a_fixed_seeded_choice_of_training_rows():
    rows = np.arange(10, 40)
    chosen = precise_bn_rows(rows, scans=9, batch_size=2, seed=0)
    assert len(chosen) == 8 and set(chosen) <= set(rows) and len(set(chosen)) == 8
    assert np.array_equal(chosen, precise_bn_rows(rows, scans=9, batch_size=2, seed=0))
    assert not np.array_equal(chosen, precise_bn_rows(rows, scans=9, batch_size=2, seed=1))
    assert len(precise_bn_rows(rows, scans=1000, batch_size=4, seed=0)) == 28  # all whole batches there are
    assert len(precise_bn_rows(rows[:1], scans=64, batch_size=2, seed=0)) == 1  # at least one (smaller) batch


def test_recipes_fill_only_what_the_flags_leave_unset():
    tutorial = resolve_recipe(FitOptions(recipe="tutorial"))
    assert (tutorial.learning_rate, tutorial.bn_momentum, tutorial.precise_bn_scans, tutorial.schedule,
            tutorial.precision, tutorial.pooling) == (1e-4, 0.99, 0, "tutorial", "float32", "avg")
    assert tutorial.keep == "best"  # the tutorial's ModelCheckpoint(save_best_only=True)
    default = resolve_recipe(FitOptions())
    assert default.recipe == "precise" and default.precise_bn_scans > 0 and default.schedule == "cosine"
    assert default.precision == "auto" and default.keep == "last"
    mixed = resolve_recipe(FitOptions(recipe="tutorial", precise_bn_scans=16, learning_rate=5e-4))
    assert (mixed.precise_bn_scans, mixed.learning_rate, mixed.bn_momentum) == (16, 5e-4, 0.99)
    for recipe in RECIPES:
        check_fit_options(replace(resolve_recipe(FitOptions(recipe=recipe)), precision="float32"))
    with pytest.raises(UserError, match="--recipe must be one of"):
        resolve_recipe(FitOptions(recipe="fast"))


@pytest.mark.parametrize("changes, flag", [
    ({"bn_momentum": 1.0}, "--bn-momentum"), ({"bn_momentum": -0.1}, "--bn-momentum"),
    ({"schedule": "linear"}, "--schedule"), ({"warmup_epochs": -1}, "--warmup-epochs"),
    ({"schedule": "tutorial", "warmup_epochs": 2}, "--warmup-epochs needs --schedule cosine"),
    ({"precise_bn_scans": -5}, "--precise-bn-scans"), ({"pooling": "attention"}, "--pooling"),
    ({"keep": "first"}, "--keep"), ({"augment": "flip"}, "--augment must be one of"), ({"width": 0.1}, "--width"), ({"width": 5}, "--width"), ({"width": True}, "--width"),
])
def test_bad_recipe_options_are_one_line(changes, flag):
    with pytest.raises(UserError, match=flag):
        check_fit_options(resolve_recipe(FitOptions(**changes)))


def test_a_run_from_before_recipes_resumes_only_as_the_tutorial_recipe():
    old = {name: value for name, value in FitOptions(learning_rate=1e-4).to_json().items()
           if name not in RECIPES["tutorial"] and name != "recipe"} | {"learning_rate": 1e-4, "precision": "float32"}
    assert changed_options(old, resolve_recipe(FitOptions(recipe="tutorial"))) == []
    assert any("--recipe 'tutorial' in the run" in change for change in
               changed_options(old, replace(resolve_recipe(FitOptions()), precision="float32")))


def test_a_run_from_before_width_resumes_only_at_width_1():
    old = {name: value for name, value in resolve_recipe(FitOptions()).to_json().items() if name != "width"}
    assert changed_options(old, resolve_recipe(FitOptions())) == []
    assert changed_options(old, resolve_recipe(FitOptions(width=0.5))) == ["--width 1.0 in the run, 0.5 now"]


def test_a_run_from_before_augment_resumes_only_with_the_tutorials_rotations():
    old = {name: value for name, value in resolve_recipe(FitOptions()).to_json().items() if name != "augment"}
    assert changed_options(old, resolve_recipe(FitOptions(augment="rotate"))) == []
    assert changed_options(old, resolve_recipe(FitOptions(augment="rotate-mirror-shift"))) == [
        "--augment 'rotate' in the run, 'rotate-mirror-shift' now"]


def test_precision_auto_on_this_machine_is_the_decision_on_what_it_reads(tmp_path):
    """The pure decision is tested per combination in test_precision.py; here, that `resolve_precision`
    feeds it this machine (no GPU) and that the flags are read from /proc/cpuinfo's first CPU."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "sse", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == set()
    assert resolve_precision("float32").policy == "float32"
    assert resolve_precision("auto") == auto_precision(*this_machine())


def test_cosine_schedule_warms_up_then_decays_to_zero():
    options = resolve_recipe(FitOptions(epochs=10, warmup_epochs=2, learning_rate=1e-3))
    schedule = make_schedule(options, steps_per_epoch=5)
    rates = [float(schedule(step)) for step in range(0, 51)]
    assert rates[0] == 0.0 and rates[5] == pytest.approx(5e-4) and rates[10] == pytest.approx(1e-3)
    assert all(later < earlier for earlier, later in zip(rates[10:50], rates[11:50]))
    assert rates[50] == pytest.approx(0.0, abs=1e-9)
    tutorial = make_schedule(resolve_recipe(FitOptions(recipe="tutorial")), steps_per_epoch=5)
    assert float(tutorial(99_999)) == pytest.approx(1e-4) and float(tutorial(100_000)) == pytest.approx(0.96e-4)
    one_epoch = make_schedule(resolve_recipe(FitOptions(epochs=1, warmup_epochs=3)), steps_per_epoch=4)
    assert float(one_epoch(0)) == pytest.approx(RECIPES["precise"]["learning_rate"])  # no room to warm up


def test_roc_curve_is_exact_and_its_area_is_the_auc():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9])
    false_positive_rate, true_positive_rate = compute_roc_curve(labels, scores)
    # thresholds 0.9, 0.8 (one of each class: a diagonal step), 0.4, 0.35, 0.1
    assert false_positive_rate.tolist() == [0.0, 0.0, 1 / 3, 2 / 3, 2 / 3, 1.0]
    assert true_positive_rate.tolist() == [0.0, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0]
    assert np.trapezoid(true_positive_rate, false_positive_rate) == pytest.approx(compute_roc_auc(labels, scores))


def fit_tutorial_recipe(cache: Path, run_dir: Path, seed: int, epochs: int) -> list[dict]:
    fit_model(FitOptions(cache=cache, run_dir=run_dir, epochs=epochs, seed=seed, padding="same", quiet=True,
                         recipe="tutorial"))
    config = json.loads((run_dir / "config.json").read_text())["options"]
    assert {name: config[name] for name in RECIPES["tutorial"]} == RECIPES["tutorial"]
    return read_history(run_dir / "history.csv")


def train_as_the_code_before_recipes(cache: Path, seed: int, epochs: int) -> list[dict]:
    """The training of commit dc2092b, restated with Keras alone: the tutorial's network (BatchNorm
    momentum 0.99, global average pooling, float32), Adam at 1e-4 on the tutorial's staircase decay,
    no re-estimation of BatchNorm, and Keras's own `fit` over the same seeded tf.data pipelines."""
    from train.loop.loop import DECAY_RATE, DECAY_STEPS, configure_determinism
    from train.network.tasks import compute_class_weights, make_loss, make_task, make_training_metrics
    from train.pipeline.data import (
        make_training_dataset, make_validation_dataset, sample_weights_of, steps_per_epoch,
    )
    from train.pipeline.folds import rows_and_classes

    batch_size = 2
    configure_determinism(seed)
    with CacheReader(cache) as reader:
        task = make_task("binary", reader)
        (train_rows, train_classes), (val_rows, val_classes) = rows_and_classes(reader, FitOptions(cache=cache), task)
        row_weights = sample_weights_of(train_classes, compute_class_weights(task, train_classes))
        model = build_model(reader.shape, padding="same", precision="float32", bn_momentum=0.99, pooling="avg")
        schedule = keras.optimizers.schedules.ExponentialDecay(1e-4, decay_steps=DECAY_STEPS, decay_rate=DECAY_RATE,
                                                               staircase=True)
        model.compile(optimizer=keras.optimizers.Adam(schedule), loss=make_loss(task),
                      metrics=make_training_metrics(task))
        history = model.fit(
            make_training_dataset(reader, train_rows, train_classes.astype(np.float32), batch_size, seed,
                                  epochs=epochs, row_weights=row_weights),
            epochs=epochs, steps_per_epoch=steps_per_epoch(len(train_rows), batch_size),
            validation_data=make_validation_dataset(reader, val_rows, val_classes.astype(np.float32), batch_size),
            verbose=0, shuffle=False,
        ).history
    return [{"epoch": epoch + 1} | {name: values[epoch] for name, values in history.items()} for epoch in range(epochs)]


def test_tutorial_recipe_trains_as_the_code_before_recipes_on_this_machine(tiny_cache, tmp_path):
    """Portable: both sides run here, on this CPU's kernels, so they must agree to the last bit."""
    seed, epochs = 7, 3
    expected = train_as_the_code_before_recipes(tiny_cache, seed, epochs)
    keras.backend.clear_session()
    history = fit_tutorial_recipe(tiny_cache, tmp_path / "tutorial", seed, epochs)
    assert len(history) == epochs
    for row, reference in zip(history, expected):
        for name in ("loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"):
            assert row[name] == pytest.approx(reference[name], rel=1e-6, abs=1e-7), (row["epoch"], name)


@pytest.fixture(scope="module")
def whole_scan_cache(synthetic_raw, tmp_path_factory) -> Path:
    """`tiny_cache` as the code before the lung crop built it (`--crop none`): what the golden history trained on."""
    from preprocess.engine.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("whole") / "tiny-whole.h5"
    build_cache(BuildOptions(raw=synthetic_raw, out=out, jobs=1, shape=(32, 32, 16), quiet=True, crop="none"))
    return out


def test_tutorial_recipe_reproduces_the_history_of_the_code_before_recipes(whole_scan_cache, tmp_path):
    """tests/data/tutorial_recipe_history.json holds what the code before recipes (commit dc2092b) wrote on this
    fixture's whole scans, once per kind of CPU kernels; compared only where this process runs the same kernels."""
    from train.hardware import numerics_key

    golden = json.loads(GOLDEN.read_text())
    key = numerics_key()
    if key not in golden["histories"]:
        pytest.skip(f"no history of the code before recipes recorded for {key!r} (recorded: "
                    f"{', '.join(golden['histories'])}); the same-machine comparison above still runs")
    history = fit_tutorial_recipe(whole_scan_cache, tmp_path / "tutorial", golden["seed"], golden["epochs"])
    assert len(history) == len(golden["histories"][key])
    for row, expected in zip(history, golden["histories"][key]):
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (row["epoch"], name)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    """24 phantoms (12 of each class) at 32 x 32 x 16, a quarter of each class for validation (6 scans)."""
    from preprocess.engine.build import BuildOptions, build_cache
    from preprocess.phantoms.synth import write_synthetic_archive

    folder = tmp_path_factory.mktemp("small")
    write_synthetic_archive(folder / "raw", normal=12, abnormal=12, size=48, seed=5, progress=False)
    build_cache(BuildOptions(raw=folder / "raw", out=folder / "small.h5", jobs=1, shape=(32, 32, 16),
                             val_fraction=0.25, quiet=True))
    return folder / "small.h5"


@pytest.mark.slow
def test_default_recipe_validates_on_both_classes_where_the_tutorial_calls_one(small_cache, tmp_path):
    """Four epochs on 24 phantoms: the tutorial's moving statistics make every validation prediction the same
    number (one class); with the re-estimated statistics, the run's model calls both classes."""
    called = {}
    for recipe in ("tutorial", "precise"):
        run_dir = tmp_path / recipe
        fit_model(FitOptions(cache=small_cache, run_dir=run_dir, epochs=4, seed=0, padding="same", quiet=True,
                             recipe=recipe))
        model = load_trained_model(model_path(run_dir))
        with CacheReader(small_cache) as reader:
            called[recipe] = predict_split(model, reader, reader.split("val")) >= 0.5
    assert len(set(called["tutorial"].tolist())) == 1
    assert set(called["precise"].tolist()) == {False, True}


def test_checkpoints_hold_the_re_estimated_statistics(tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    options = FitOptions(cache=tiny_cache, run_dir=run_dir, epochs=2, seed=2, padding="same", quiet=True,
                         precision="float32")
    fit_model(options)
    config = json.loads((run_dir / "config.json").read_text())["options"]
    assert config["precise_bn_scans"] == RECIPES["precise"]["precise_bn_scans"] and config["precision"] == "float32"
    state = read_state(run_dir)
    for name in {state.last_model, state.best_model}:
        model = load_trained_model(run_dir / name)
        stored = [(np.array(layer.moving_mean), np.array(layer.moving_variance)) for layer in batchnorm_layers(model)]
        with CacheReader(tiny_cache) as reader:
            batches = make_precise_bn_batches(reader, reader.split("train"), resolve_recipe(options))
            recomputed = estimate_population_statistics(model, batches)
        for (mean, variance), (mean_again, variance_again) in zip(stored, recomputed):
            np.testing.assert_allclose(mean, mean_again, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(variance, variance_again, rtol=1e-4, atol=1e-6)


def test_fit_and_evaluate_draw_roc_curves(tiny_cache, tmp_path):
    from train.evaluate import evaluate_run, format_report

    run_dir = tmp_path / "run"
    fit_model(FitOptions(cache=tiny_cache, run_dir=run_dir, epochs=1, padding="same", quiet=True))
    assert (run_dir / "roc_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = evaluate_run(run_dir, tiny_cache, "val")
    assert report["roc_curve"] == str(run_dir / f"roc_val_{tiny_cache.stem}.png")
    assert Path(report["roc_curve"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = format_report(report).splitlines()
    assert lines[-2:] == [f"ROC curve: {report['roc_curve']}", f"reliability diagram: {report['reliability_diagram']}"]
    assert Path(report["reliability_diagram"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.rmtree(run_dir)
