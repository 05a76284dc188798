"""The cache schema: a write followed by a read gives the same bytes; bad files are refused clearly."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from preprocess.reading.scan_stats import compute_scan_stats

from preprocess.cache import (
    SCHEMA_VERSION, CacheError, CacheReader, CacheWriter, Failure, Preprocessing, ScanRecord, SplitOptions,
    temp_path_for,
)

PREPROCESSING = Preprocessing((8, 8, 4), -1000.0, 400.0, "test-method", "RAS")
SPLIT_OPTIONS = SplitOptions(3, 0.25, 0.25)


def record(index: int, label: int) -> ScanRecord:
    return ScanRecord(
        scan_id=f"CT-{label}/study_{index:04d}", label=label, class_name=f"CT-{label}",
        source_path=f"CT-{label}/study_{index:04d}.nii.gz", source_sha256=f"{index:064x}", source_size=100 + index,
        source_mtime_ns=10**18 + index, source_shape=(512, 512, 40 + index), source_spacing_mm=(0.7, 0.7, 8.0),
        stats=compute_scan_stats(np.full((16, 16, 40 + index), -1000.0 + 100 * index), (0.7, 0.7, 8.0)),
    )


def write_cache(path, rows=4, seed=0):
    rng = np.random.default_rng(seed)
    volumes = [rng.random(PREPROCESSING.shape, dtype=np.float32) for _ in range(rows)]
    records = [record(index, index % 2) for index in range(rows)]
    records.sort(key=lambda item: item.scan_id)
    with CacheWriter(path, PREPROCESSING, SPLIT_OPTIONS, capacity=rows + 2, package_version="9.9") as writer:
        for item, volume in zip(records, volumes):
            writer.append(item, volume)
        splits = {"train": np.arange(0, rows - 2), "val": np.array([rows - 2]), "test": np.array([rows - 1])}
        writer.commit(splits, [Failure("CT-1/bad.nii.gz", "empty file", 0, 5)])
    return records, volumes


def test_write_then_read_gives_identical_content(tmp_path):
    path = tmp_path / "cache.h5"
    records, volumes = write_cache(path)
    with CacheReader(path) as reader:
        assert len(reader) == 4
        assert reader.records() == records
        assert reader.preprocessing == PREPROCESSING
        assert reader.split_options == SPLIT_OPTIONS
        for row, volume in enumerate(volumes):
            assert reader.read_volume(row).tobytes() == volume.tobytes()
        assert reader.failures() == [Failure("CT-1/bad.nii.gz", "empty file", 0, 5)]
        assert reader.attributes["schema_version"] == SCHEMA_VERSION
        assert reader.attributes["package_version"] == "9.9"
        assert len(reader.fingerprint) == 64
        assert reader.file["volumes"].chunks == (1, 8, 8, 4)  # one scan per chunk
    assert not temp_path_for(path).exists()


def test_fingerprint_follows_content(tmp_path):
    write_cache(tmp_path / "a.h5", seed=0)
    write_cache(tmp_path / "b.h5", seed=1)  # same sources and options: same fingerprint
    write_cache(tmp_path / "c.h5", rows=3)
    fingerprints = [CacheReader(tmp_path / name).fingerprint for name in ("a.h5", "b.h5", "c.h5")]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "cache.h5"
    write_cache(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with CacheWriter(path, PREPROCESSING, SPLIT_OPTIONS, capacity=2, package_version="9.9") as writer:
            writer.append(record(0, 0), np.zeros(PREPROCESSING.shape, np.float32))
            raise RuntimeError("interrupted")
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_rows_must_come_in_order(tmp_path):
    with pytest.raises(ValueError, match="out of order"):
        with CacheWriter(tmp_path / "c.h5", PREPROCESSING, SPLIT_OPTIONS, 3, "9.9") as writer:
            writer.append(record(2, 0), np.zeros(PREPROCESSING.shape, np.float32))
            writer.append(record(1, 0), np.zeros(PREPROCESSING.shape, np.float32))


def damage(path, edit):
    with h5py.File(path, "r+") as file:
        edit(file)
    return path


DAMAGES = {
    "no such cache": (lambda path: path.unlink(), "no such cache"),
    "not HDF5": (lambda path: path.write_bytes(b"just some text\n" * 100), "not an HDF5 file"),
    "foreign HDF5": (lambda path: h5py.File(path, "w").close(), "not this project's cache"),
    "old schema": (lambda path: damage(path, lambda f: f.attrs.__setitem__("schema_version", 0)), "schema version 0"),
    "missing table": (lambda path: damage(path, lambda f: f.__delitem__("labels")), "missing labels"),
    "wrong dtype": (lambda path: damage(path, lambda f: (f.__delitem__("volumes"),
                                                         f.create_dataset("volumes", data=np.zeros((4, 8, 8, 4)))),
                    ), "float64"),
    "wrong shape": (lambda path: damage(path, lambda f: (f.__delitem__("volumes"),
                                                         f.create_dataset("volumes", (4, 8, 8, 5), "f4"))), r"\(N, 8, 8, 4\)"),
    "short table": (lambda path: damage(path, lambda f: (f.__delitem__("labels"),
                                                         f.create_dataset("labels", data=np.zeros(3, "i1")))), "3 rows"),
    "bad labels": (lambda path: damage(path, lambda f: f["labels"].__setitem__(0, 7)), "labels"),
    "split out of range": (lambda path: damage(path, lambda f: f["splits/test"].__setitem__(0, 99)), "outside"),
    "splits overlap": (lambda path: damage(path, lambda f: f["splits/test"].__setitem__(0, 0)), "partition"),
    "missing attribute": (lambda path: damage(path, lambda f: f.attrs.__delitem__("shape")), "attributes shape"),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_reader_refuses_bad_files_with_one_clear_message(tmp_path, name):
    path = tmp_path / "cache.h5"
    write_cache(path)
    breaker, message = DAMAGES[name]
    breaker(path)
    with pytest.raises(CacheError, match=message) as caught:
        CacheReader(path)
    assert "\n" not in str(caught.value)


def test_damaged_chunks_read_as_garbage_and_a_cut_file_is_one_clear_error(tmp_path):
    """HDF5 keeps no checksum of raw chunks: garbage reads back as values (train checks them),
    while a file cut short is refused with a CacheError, at open or at the read."""
    path = tmp_path / "cache.h5"
    write_cache(path)
    with h5py.File(path, "r") as file:
        offset = file["volumes"].id.get_chunk_info(2).byte_offset
    data = bytearray(path.read_bytes())
    data[offset: offset + 256] = b"\xff" * 256  # inside row 2's data: 0xffffffff is a NaN
    path.write_bytes(bytes(data))
    with CacheReader(path) as reader:
        assert np.isfinite(reader.read_volume(0)).all()
        assert np.isnan(reader.read_volume(2)).any()
    truncated = tmp_path / "truncated.h5"
    write_cache(truncated)
    with h5py.File(truncated, "r") as file:
        last_chunk_end = file["volumes"].id.get_chunk_info(3).byte_offset
    truncated.write_bytes(truncated.read_bytes()[:last_chunk_end + 16])
    with pytest.raises(CacheError, match="truncated|cannot be read|not an HDF5"):
        with CacheReader(truncated) as reader:
            reader.read_volume(3)


def test_preprocessing_round_trips_through_json_and_names_its_differences(tmp_path):
    """One owner of the preprocessing options: to JSON (config.json), back, and compared."""
    from common.errors import UserError
    from preprocess.preprocessing import Preprocessing

    current = Preprocessing.of_this_code((8, 8, 4), (-1000, 400))
    document = current.to_json()
    assert document["shape"] == [8, 8, 4] and isinstance(document["hu_min"], float)
    assert Preprocessing.from_json(document, tmp_path) == current
    assert current.differences(document) == {}
    assert current.differences({**document, "hu_max": 300.0}) == {"hu_max": (300.0, 400.0)}
    with pytest.raises(UserError, match="this version of preprocess makes 'RAS'"):
        Preprocessing.from_json({**document, "orientation": "LPS"}, tmp_path)
    with pytest.raises(UserError, match="damaged preprocessing options"):
        Preprocessing.from_json({**document, "shape": [8, 8]}, tmp_path)
    with pytest.raises(UserError, match="no preprocessing options"):
        Preprocessing.from_json({"shape": [8, 8, 4]}, tmp_path)
