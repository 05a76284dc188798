"""`python -m preprocess`: argument parsing only; the work happens in the modules it calls."""
from __future__ import annotations

import sys
from pathlib import Path

from common.cli import (
    ArgumentParser, HelpFormatter, configure_logging, finite_float, fraction, non_negative_int, positive_float, positive_int,
    run_command,
)
from preprocess.engine.options import BACKENDS, CROPS, BuildOptions

PROG = "python -m preprocess"
DEFAULTS = BuildOptions()


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Turn a folder of NIfTI chest CT scans into one HDF5 cache.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build", help="preprocess scans into the cache (incremental, atomic)",
        description="Preprocess every scan under --raw (CT-0 = normal, CT-k = abnormal) into one HDF5 cache. "
        "Unchanged scans are reused from the existing cache; the new file replaces the old one only "
        "when complete.",
        formatter_class=HelpFormatter,
    )
    build.add_argument("--raw", type=Path, default=DEFAULTS.raw,
                       help="folder with CT-0, CT-1, ... class folders of NIfTI files or DICOM series")
    build.add_argument("--labels", type=Path, default=DEFAULTS.labels, metavar="FILE.csv",
                       help="a CSV with the columns path,class (paths relative to --raw: NIfTI files or DICOM "
                       "series folders) instead of class folders")
    build.add_argument("--normal-class", default=DEFAULTS.normal_class, metavar="NAME",
                       help="the class whose scans are normal (label 0); every other class is label 1")
    build.add_argument("--out", type=Path, default=DEFAULTS.out, help="cache file to write")
    build.add_argument("--jobs", type=positive_int, default=DEFAULTS.jobs, help="parallel worker processes (all cores by default)")
    build.add_argument("--shape", type=positive_int, nargs=3, metavar=("H", "W", "D"), default=DEFAULTS.shape,
                       help="target volume shape: in-plane H W, then D slices")
    build.add_argument("--crop", choices=CROPS, default=DEFAULTS.crop,
                       help="lungs: find each scan's lungs and keep only their box (plus a 10%% margin) before "
                       "resizing, so a small lesion keeps more voxels; a scan without lungs fails. none: the "
                       "whole field of view, as the Keras tutorial")
    masks = build.add_mutually_exclusive_group()
    masks.add_argument("--masks", type=Path, default=None, metavar="FOLDER",
                       help="lesion masks, MosMedData's <study>_mask.nii.gz on each scan's grid, cut and resized "
                       "with their scans into the cache, for `fit` to learn where lesions are (default: "
                       "<raw>/masks when it exists)")
    masks.add_argument("--no-masks", action="store_true", help="cache no lesion masks, even where <raw>/masks exists")
    build.add_argument("--hu-window", type=finite_float, nargs=2, metavar=("LOW", "HIGH"),
                       default=DEFAULTS.hu_window, help="Hounsfield window clipped and scaled to [0, 1]")
    build.add_argument("--seed", type=non_negative_int, default=DEFAULTS.seed, help="seed of the train/val/test split")
    build.add_argument("--val-fraction", type=fraction, default=DEFAULTS.val_fraction, help="share of each class for validation")
    build.add_argument("--test-fraction", type=fraction, default=DEFAULTS.test_fraction, help="share of each class for test")
    build.add_argument("--scan-timeout", type=positive_float, default=DEFAULTS.scan_timeout_seconds, metavar="SECONDS",
                       help="give up on a scan that takes longer (it is recorded as failed)")
    build.add_argument("--backend", choices=BACKENDS, default=DEFAULTS.backend,
                       help="where scans are preprocessed: local worker processes (loky), threads of this "
                       "process (threads: no start-up, no copies, but one crashing scan stops the build), "
                       "or a Dask cluster (dask, with --scheduler; its worker threads replace --jobs)")
    build.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="Dask scheduler address, e.g. tcp://HOST:8786; workers must see --raw at the same path")
    build.add_argument("--force", action="store_true", help="rebuild every scan, and overwrite a file that is not a cache")
    build.add_argument("--strict", action="store_true", help="fail the whole build if any scan cannot be used")
    build.add_argument("--quiet", action="store_true", help="no progress bar; only warnings and errors")

    synth = commands.add_parser(
        "synth", help="write synthetic chest-CT phantoms in the MosMedData layout",
        description="Write deterministic synthetic chest-CT phantoms (int16 .nii.gz, CT-0 normal, CT-1 with "
        "ground-glass opacities and consolidations) for demos and tests. With --grades, abnormal scans are "
        "graded like MosMedData's severity folders by the share of lung their lesions cover: CT-1 under 25%, "
        "CT-2 25-50%, CT-3 50-75%, CT-4 over 75%. This is NOT real patient data.",
        formatter_class=HelpFormatter,
    )
    synth.add_argument("--out", type=Path, default=Path("data/synthetic"),
                       help="folder to write CT-0/ and CT-1/ (or one CT-k/ per grade) into")
    synth.add_argument("--normal", type=non_negative_int, default=10, help="number of normal scans")
    synth.add_argument("--abnormal", type=non_negative_int, default=10, help="number of abnormal scans")
    synth.add_argument("--size", type=positive_int, default=512, help="in-plane size in pixels")
    synth.add_argument("--slices", type=positive_int, nargs=2, metavar=("MIN", "MAX"), default=None,
                       help="range of slice counts (default: 30-60 at 512 pixels, scaled with --size)")
    synth.add_argument("--grades", type=int, nargs="+", metavar="GRADE", default=None,
                       help="severity grades 1-4 dealt round robin to the abnormal scans, e.g. --grades 1 2 3 4 "
                       "(default: ungraded lesions of any extent, all in CT-1)")
    synth.add_argument("--involvement", type=finite_float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="the lesions' share of the lung, in percent, drawn log-uniformly between LOW and HIGH "
                       "for each abnormal scan, e.g. --involvement 0.1 1 for mild CT-1 findings (the range must "
                       "lie inside one grade's; the scans go to that grade's folder)")
    synth.add_argument("--masks", action="store_true",
                       help="also write each abnormal phantom's lesion mask to OUT/masks/study_NNNN_mask.nii.gz, as "
                       "MosMedData ships its masks (`build` finds them there)")
    synth.add_argument("--seed", type=non_negative_int, default=0, help="seed of the phantoms")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")

    download = commands.add_parser(
        "download", help="fetch the tutorial's MosMedData subset (CT-0.zip, CT-23.zip)",
        description="Download, verify and safely extract the Keras tutorial's MosMedData subset. "
        "Interrupted downloads resume.",
        formatter_class=HelpFormatter,
    )
    download.add_argument("--out", type=Path, default=DEFAULTS.raw, help="folder to extract into")
    download.add_argument("--base-url", default=None, help="where CT-0.zip and CT-23.zip are served "
                          "(default: the tutorial's GitHub release)")
    download.add_argument("--quiet", action="store_true", help="no progress bar")

    info = commands.add_parser("info", help="summarise a cache: counts, shape, options, failures",
                               description="Print a cache's counts per class and split, its options and failures.")
    info.add_argument("file", type=Path, metavar="FILE", help="cache file")

    show = commands.add_parser("show", help="write a PNG montage of one cached scan",
                               description="Write a PNG montage of one cached scan's axial slices.")
    show.add_argument("file", type=Path, metavar="FILE", help="cache file")
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=non_negative_int, help="row number in the cache")
    which.add_argument("--scan-id", help='scan id, e.g. "CT-1/study_0012"')
    show.add_argument("--out", type=Path, default=None, help="PNG path (default: <scan id>.png here)")
    show.add_argument("--raw", type=Path, default=None, metavar="FOLDER",
                      help="the folder the cache was built from: show the whole scan with its lungs' box drawn "
                      "on it (without: the cached volume, which is that box)")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = make_parser().parse_args(argv)
    configure_logging(getattr(arguments, "quiet", False))
    command = {"build": run_build, "synth": run_synth, "download": run_download, "info": run_info, "show": run_show}
    return run_command(PROG, lambda: command[arguments.command](arguments))


def run_build(arguments) -> None:
    from preprocess.engine.build import build_cache

    options = BuildOptions(
        raw=arguments.raw, out=arguments.out, jobs=arguments.jobs, shape=tuple(arguments.shape),
        hu_window=tuple(arguments.hu_window), seed=arguments.seed, val_fraction=arguments.val_fraction,
        test_fraction=arguments.test_fraction, scan_timeout_seconds=arguments.scan_timeout,
        backend=arguments.backend, scheduler=arguments.scheduler, force=arguments.force, strict=arguments.strict,
        quiet=arguments.quiet, labels=arguments.labels, normal_class=arguments.normal_class, crop=arguments.crop,
        masks=arguments.masks, use_masks=not arguments.no_masks,
    )
    report = build_cache(options)
    unlisted = (f"; {report.unlisted} scan file(s) under --raw are not in --labels and were ignored"
                if report.unlisted else "")
    if report.masks:
        unlisted += f"; {report.masks} with a lesion mask"
    if report.up_to_date:
        print(f"{report.out} is up to date: {report.cached} scans, {len(report.failures)} failed{unlisted}")
    else:
        print(f"wrote {report.out}: {report.cached} scans cached ({report.reprocessed} preprocessed, "
              f"{report.reused} reused), {len(report.failures)} failed{unlisted}")


def run_synth(arguments) -> None:
    from preprocess.phantoms.synth import write_synthetic_archive

    slice_range = tuple(arguments.slices) if arguments.slices else None
    grades = tuple(arguments.grades) if arguments.grades else None
    involvement = tuple(value / 100 for value in arguments.involvement) if arguments.involvement else None
    paths = write_synthetic_archive(arguments.out, arguments.normal, arguments.abnormal, arguments.size,
                                    arguments.seed, slice_range, progress=not arguments.quiet, grades=grades,
                                    involvement=involvement, masks=arguments.masks)
    masks = " and their lesion masks" if arguments.masks else ""
    print(f"wrote {len(paths)} synthetic scans{masks} to {arguments.out}")


def run_download(arguments) -> None:
    from preprocess.download import DEFAULT_BASE_URL, download_archives

    folders = download_archives(arguments.out, arguments.base_url or DEFAULT_BASE_URL, progress=not arguments.quiet)
    print(f"downloaded into {arguments.out}: {', '.join(str(folder) for folder in folders)}")


def run_info(arguments) -> None:
    from preprocess.cache import CacheReader
    from preprocess.summary import describe_cache

    with CacheReader(arguments.file) as reader:
        print(describe_cache(reader))


def run_show(arguments) -> None:
    from preprocess.cache import CacheError, CacheReader
    from preprocess.montage import save_montage
    from preprocess.reading.lungs import describe_region

    with CacheReader(arguments.file) as reader:
        scan_ids = reader.scan_ids
        if arguments.scan_id is not None:
            if arguments.scan_id not in scan_ids:
                raise CacheError(f"no scan {arguments.scan_id!r} in {arguments.file}")
            row = scan_ids.index(arguments.scan_id)
        else:
            if arguments.index >= len(scan_ids):
                raise CacheError(f"--index {arguments.index} is out of range: {arguments.file} has {len(scan_ids)} scans")
            row = arguments.index
        label = "abnormal" if reader.labels[row] else "normal"
        out = arguments.out or Path(scan_ids[row].replace("/", "_") + ".png")
        title = f"{scan_ids[row]} ({reader.class_names[row]}, {label})"
        stats = reader.scan_stats()
        box = stats[row].lung_box if stats and stats[row].has_lungs else None
        region = describe_region(reader.preprocessing.crop, box, stats[row].scan_shape if stats else None)
        if arguments.raw is None:
            save_montage(reader.read_volume(row), out, f"{title}\n{region}")
        else:
            whole, shown_box = whole_scan_view(arguments.raw / reader.records()[row].source_path, box, reader)
            save_montage(whole, out, f"{title}, whole scan\n{region}", box=shown_box)
    print(f"wrote {out}")


def whole_scan_view(path: Path, box, reader):
    """A scan's whole volume, windowed as the cache's, at most 128 pixels in-plane, and its box on that grid."""
    from preprocess.cache import CacheError
    from preprocess.reading.formats import describe_scan_failure, open_any_scan
    from preprocess.reading.lungs import in_plane_stride
    from preprocess.reading.transform import window_volume

    try:
        scan = open_any_scan(path)
    except Exception as error:  # the source moved, changed or cannot be read: say which and why
        raise CacheError(f"cannot show {path}: {describe_scan_failure(error)}") from None
    stride = in_plane_stride(scan.stored.shape)  # the lung search's sampling: at most 128 pixels a side
    preprocessing = reader.preprocessing
    whole = window_volume(scan.hounsfield(stride=stride), preprocessing.hu_min, preprocessing.hu_max)
    if box is None:
        return whole, None
    x0, x1, y0, y1, z0, z1 = box
    return whole, (x0 // stride, -(-x1 // stride), y0 // stride, -(-y1 // stride), z0, z1)


if __name__ == "__main__":
    sys.exit(main())
