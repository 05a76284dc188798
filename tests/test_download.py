"""Tests for preprocess.download against a real HTTP server on 127.0.0.1 that supports Range."""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import logging
import re
import socket
import stat
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.errors import UserError
import common.files as files
from preprocess import download
from preprocess.download import download_archives, fetch_with_resume


@dataclass
class ServerState:
    """What the test server serves and how it misbehaves; it records every request it gets."""

    root: Path
    base_url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    ignore_range: bool = False
    missing_tail_bytes: int = 0
    stall: threading.Event | None = None

    def requests_for(self, name: str) -> list[str | None]:
        """The Range headers (None when absent) of the GET requests for one file."""
        return [range_header for path, range_header in self.requests if path == f"/{name}"]


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from state.root, answering `Range: bytes=N-` with 206 or 416."""

    def do_GET(self) -> None:
        state: ServerState = self.server.state
        state.requests.append((self.path, self.headers.get("Range")))
        if self.path.startswith("/redirect/"):  # as GitHub does, to its storage host
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if state.stall is not None:
            state.stall.wait(5)
            return
        path = state.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start_byte = 0
        range_header = self.headers.get("Range")
        if range_header and not state.ignore_range:
            start_byte = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start_byte >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start_byte}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start_byte:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) - state.missing_tail_bytes])

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path):
    state = ServerState(root=tmp_path / "served")
    state.root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield state
    if state.stall is not None:
        state.stall.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """OUT sits alone in its parent, so anything written beside it is visible."""
    parent = tmp_path / "work"
    parent.mkdir()
    return parent / "out"


def fake_scan_bytes(label: str) -> bytes:
    """A small gzip payload standing in for a .nii.gz; content is irrelevant to the downloader."""
    noise = b"".join(hashlib.sha256(f"{label}-{index}".encode()).digest() for index in range(128))
    return gzip.compress(noise, mtime=0)


def make_zip(path: Path, entries: dict, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """Write a zip of {name or ZipInfo: bytes} and return its bytes."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    return path.read_bytes()


@pytest.fixture
def archives(server) -> dict[str, dict[str, bytes]]:
    """Serve CT-0.zip and CT-23.zip, two fake scans each; return {zip name: {entry: bytes}}."""
    contents = {}
    for class_name in ("CT-0", "CT-23"):
        entries = {f"{class_name}/study_{index:04d}.nii.gz": fake_scan_bytes(f"{class_name}-{index}")
                   for index in range(2)}
        make_zip(server.root / f"{class_name}.zip", entries)
        contents[f"{class_name}.zip"] = entries
    return contents


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_extracted(out_dir: Path, entries: dict[str, bytes]) -> None:
    for entry, data in entries.items():
        assert (out_dir / entry).read_bytes() == data


def assert_nothing_extracted(out_dir: Path, name: str = "CT-0.zip") -> None:
    """No marker, no class folder, no temporary folder, no verified archive left behind."""
    downloads_dir = out_dir / ".downloads"
    assert not (downloads_dir / f"{name}.done").exists()
    assert not (downloads_dir / name).exists()
    assert sorted(path.name for path in out_dir.iterdir()) == [".downloads"]


def serve_unsafe_zip(server, entries: dict) -> None:
    """Serve CT-0.zip holding one good scan first, then the given entries."""
    make_zip(server.root / "CT-0.zip", {"CT-0/good.nii.gz": fake_scan_bytes("good"), **entries})


# --- normal operation ------------------------------------------------------------------------------

def test_download_extracts_class_folders_and_writes_markers(server, archives, out_dir):
    served_sha256 = {name: sha256_of(server.root / name) for name in archives}
    folders = download_archives(out_dir, server.base_url, progress=False,
                                expected_sha256={"CT-0.zip": served_sha256["CT-0.zip"].upper()})
    assert folders == [out_dir / "CT-0", out_dir / "CT-23"]
    for name, entries in archives.items():
        assert_extracted(out_dir, entries)
        marker = json.loads((out_dir / ".downloads" / f"{name}.done").read_text())
        assert marker["sha256"] == served_sha256[name]
    # only markers remain in .downloads: no .part, no zip, no temporary folder in OUT
    downloads = sorted(path.name for path in (out_dir / ".downloads").iterdir())
    assert downloads == ["CT-0.zip.done", "CT-23.zip.done"]
    assert sorted(path.name for path in out_dir.iterdir()) == [".downloads", "CT-0", "CT-23"]


def test_rerun_skips_without_any_request(server, archives, out_dir, caplog):
    first_folders = download_archives(out_dir, server.base_url, progress=False)
    request_count = len(server.requests)
    with caplog.at_level(logging.INFO, logger="preprocess.download"):
        second_folders = download_archives(out_dir, server.base_url, progress=False)
    assert len(server.requests) == request_count
    assert second_folders == first_folders
    assert "CT-0.zip is already downloaded and extracted" in caplog.text


def test_marker_is_not_trusted_when_an_extracted_file_is_missing(server, archives, out_dir):
    download_archives(out_dir, server.base_url, progress=False)
    (out_dir / "CT-23" / "study_0001.nii.gz").unlink()
    download_archives(out_dir, server.base_url, progress=False)
    assert server.requests_for("CT-0.zip") == [None]
    assert server.requests_for("CT-23.zip") == [None, None]
    assert_extracted(out_dir, archives["CT-23.zip"])


def test_nested_entries_extract_to_the_path_they_name(server, out_dir):
    entries = {"MosMedData/CT-0/study_0000.nii.gz": fake_scan_bytes("nested")}
    make_zip(server.root / "CT-0.zip", entries)
    folders = download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert folders == [out_dir / "MosMedData" / "CT-0"]
    assert_extracted(out_dir, entries)


# --- resume ----------------------------------------------------------------------------------------

def test_resume_sends_range_and_gives_identical_bytes(server, archives, out_dir):
    served = (server.root / "CT-0.zip").read_bytes()
    part_path = out_dir / ".downloads" / "CT-0.zip.part"
    part_path.parent.mkdir(parents=True)
    part_path.write_bytes(served[:1000])
    assert fetch_with_resume(server.base_url + "CT-0.zip", part_path, progress=False) == len(served)
    assert server.requests_for("CT-0.zip") == ["bytes=1000-"]
    assert part_path.read_bytes() == served


def test_resume_through_download_archives(server, archives, out_dir):
    served = (server.root / "CT-0.zip").read_bytes()
    part_path = out_dir / ".downloads" / "CT-0.zip.part"
    part_path.parent.mkdir(parents=True)
    part_path.write_bytes(served[:777])
    download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert server.requests_for("CT-0.zip") == ["bytes=777-"]
    assert json.loads((out_dir / ".downloads" / "CT-0.zip.done").read_text())["sha256"] == sha256_of(
        server.root / "CT-0.zip")
    assert_extracted(out_dir, archives["CT-0.zip"])


def test_resume_follows_a_redirect_with_the_range(server, archives, out_dir):
    served = (server.root / "CT-0.zip").read_bytes()
    part_path = out_dir / "CT-0.zip.part"
    out_dir.mkdir()
    part_path.write_bytes(served[:500])
    fetch_with_resume(server.base_url + "redirect/CT-0.zip", part_path, progress=False)
    assert server.requests_for("CT-0.zip") == ["bytes=500-"]
    assert part_path.read_bytes() == served


def test_server_ignoring_range_restarts_from_zero(server, archives, out_dir):
    server.ignore_range = True
    part_path = out_dir / ".downloads" / "CT-0.zip.part"
    part_path.parent.mkdir(parents=True)
    part_path.write_bytes(b"stale bytes that must not stay in front of the file")
    download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert server.requests_for("CT-0.zip")[0] is not None  # a range was asked for and ignored
    assert_extracted(out_dir, archives["CT-0.zip"])


def test_complete_part_answered_with_416_is_used_as_is(server, archives, out_dir):
    served = (server.root / "CT-0.zip").read_bytes()
    part_path = out_dir / ".downloads" / "CT-0.zip.part"
    part_path.parent.mkdir(parents=True)
    part_path.write_bytes(served)
    download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert server.requests_for("CT-0.zip") == [f"bytes={len(served)}-"]
    assert_extracted(out_dir, archives["CT-0.zip"])


def test_part_bigger_than_the_file_restarts(server, archives, out_dir):
    served = (server.root / "CT-0.zip").read_bytes()
    part_path = out_dir / ".downloads" / "CT-0.zip.part"
    part_path.parent.mkdir(parents=True)
    part_path.write_bytes(served + b"junk")
    download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert server.requests_for("CT-0.zip") == [f"bytes={len(served) + 4}-", None]
    assert_extracted(out_dir, archives["CT-0.zip"])


# --- failures the user can fix ---------------------------------------------------------------------

def test_missing_file_is_a_user_error_naming_it(server, archives, out_dir):
    with pytest.raises(UserError, match=r"CT-99\.zip.*HTTP 404"):
        download_archives(out_dir, server.base_url, names=("CT-99.zip",), progress=False)


def test_truncated_response_is_refused_and_can_be_resumed(server, archives, out_dir):
    server.missing_tail_bytes = 100
    with pytest.raises(UserError, match=r"CT-0\.zip is incomplete"):
        download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert_nothing_extracted(out_dir)
    served_size = (server.root / "CT-0.zip").stat().st_size
    server.missing_tail_bytes = 0
    download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert server.requests_for("CT-0.zip") == [None, f"bytes={served_size - 100}-"]
    assert_extracted(out_dir, archives["CT-0.zip"])


def flip_byte_inside_member(zip_bytes: bytes, member_data: bytes) -> bytes:
    position = zip_bytes.index(member_data) + len(member_data) // 2
    return zip_bytes[:position] + bytes([zip_bytes[position] ^ 0xFF]) + zip_bytes[position + 1:]


@pytest.mark.parametrize("corruption", ["crc", "not a zip"])
def test_corrupt_zip_is_refused_and_deleted(server, out_dir, tmp_path, corruption):
    payload = fake_scan_bytes("scan")
    zip_bytes = make_zip(tmp_path / "original.zip", {"CT-0/scan.nii.gz": payload}, zipfile.ZIP_STORED)
    corrupted = flip_byte_inside_member(zip_bytes, payload) if corruption == "crc" else b"<html>oops</html>"
    (server.root / "CT-0.zip").write_bytes(corrupted)
    with pytest.raises(UserError, match=r"corrupt zip CT-0\.zip"):
        download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert_nothing_extracted(out_dir)
    assert not (out_dir / ".downloads" / "CT-0.zip.part").exists()


def test_checksum_mismatch_is_refused_and_deleted(server, archives, out_dir):
    with pytest.raises(UserError, match=r"checksum mismatch for CT-0\.zip"):
        download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False,
                          expected_sha256={"CT-0.zip": "0" * 64})
    assert_nothing_extracted(out_dir)
    assert not (out_dir / ".downloads" / "CT-0.zip.part").exists()


def test_out_dir_that_is_a_file_is_a_user_error(server, archives, tmp_path):
    out_file = tmp_path / "out"
    out_file.write_text("not a folder")
    with pytest.raises(UserError, match="is a file"):
        download_archives(out_file, server.base_url, progress=False)
    assert server.requests == []


@pytest.mark.parametrize("base_url", ["ftp://127.0.0.1/", "file:///tmp/", "127.0.0.1/files/"])
def test_bad_url_scheme_is_a_user_error(out_dir, base_url):
    with pytest.raises(UserError, match="http:// or https://"):
        download_archives(out_dir, base_url, progress=False)


@pytest.mark.parametrize("name", ["../CT-0.zip", "sub/CT-0.zip", ".downloads", ""])
def test_archive_name_that_is_not_a_plain_file_name_is_refused(server, archives, out_dir, name):
    with pytest.raises(UserError, match="bad archive name"):
        download_archives(out_dir, server.base_url, names=("CT-0.zip", name), progress=False)
    assert server.requests == []  # refused before anything is fetched


def test_connection_refused_is_a_user_error(out_dir):
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match=rf"could not download http://127\.0\.0\.1:{port}/CT-0\.zip"):
        download_archives(out_dir, f"http://127.0.0.1:{port}", progress=False)


def test_silent_server_times_out_as_a_user_error(server, archives, out_dir, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_SECONDS", 0.3)
    server.stall = threading.Event()
    with pytest.raises(UserError, match=r"CT-0\.zip.*timed out"):
        download_archives(out_dir, server.base_url, progress=False)


# --- unsafe archives -------------------------------------------------------------------------------

def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, where the high 16 bits of external_attr are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize("entry, message", [
    ("../evil.txt", "contains '..'"),
    ("CT-0/../../evil.txt", "contains '..'"),
    ("..\\evil.txt", "contains '..'"),
    ("/tmp/evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"),
    ("C:\\evil.txt", "absolute path"),
    (".downloads/CT-0.zip.done", "bookkeeping"),
    (symlink_entry("CT-0/link.nii.gz"), "symbolic link"),
])
def test_unsafe_entry_is_refused_and_nothing_is_extracted(server, out_dir, entry, message):
    serve_unsafe_zip(server, {entry: b"/etc/passwd"})
    with pytest.raises(UserError, match=rf"unsafe zip CT-0\.zip: .*{re.escape(message)}"):
        download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert_nothing_extracted(out_dir)
    assert sorted(path.name for path in out_dir.parent.iterdir()) == ["out"]


def test_declared_size_over_the_limit_is_refused(server, out_dir):
    incompressible = b"".join(hashlib.sha256(index.to_bytes(4, "big")).digest() for index in range(8000))
    serve_unsafe_zip(server, {"CT-0/big.nii.gz": incompressible})
    with pytest.raises(UserError, match=r"unsafe zip CT-0\.zip: it would extract to \d+ bytes, more than"):
        download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False,
                          max_extracted_bytes=200_000)
    assert_nothing_extracted(out_dir)


def test_highly_compressed_member_is_refused_as_a_bomb(server, out_dir):
    serve_unsafe_zip(server, {"CT-0/zeros.nii.gz": bytes(50 * 1024**2)})
    with pytest.raises(UserError, match=r"unsafe zip CT-0\.zip: .*zeros\.nii\.gz.*200:1"):
        download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert_nothing_extracted(out_dir)


def test_small_highly_compressed_member_is_allowed(server, out_dir):
    entries = {"CT-0/zeros.nii.gz": bytes(1024**2)}  # exactly 1 MiB: below the ratio rule
    make_zip(server.root / "CT-0.zip", entries)
    download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert_extracted(out_dir, entries)


def test_member_that_inflates_beyond_its_declared_size_is_refused(server, out_dir, tmp_path):
    # shrink the declared size in both headers; the data then no longer matches what it claims
    payload = bytes(range(256)) * 40
    zip_bytes = make_zip(tmp_path / "original.zip", {"CT-0/scan.nii.gz": payload})
    real_size, fake_size = len(payload).to_bytes(4, "little"), (100).to_bytes(4, "little")
    assert zip_bytes.count(real_size) == 2
    (server.root / "CT-0.zip").write_bytes(zip_bytes.replace(real_size, fake_size))
    with pytest.raises(UserError, match=r"CT-0\.zip"):
        download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert_nothing_extracted(out_dir)


def test_extraction_counts_the_bytes_it_actually_writes(tmp_path, monkeypatch):
    # zipfile itself stops at the declared size; this guards against a reader that does not
    archive_path = tmp_path / ".downloads" / "CT-0.zip"
    archive_path.parent.mkdir()
    make_zip(archive_path, {"CT-0/a.nii.gz": b"x" * 10, "CT-0/b.nii.gz": b"y" * 10})
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info, *args, **kwargs: io.BytesIO(b"z" * 11))
    with pytest.raises(UserError, match="inflates to more than it declares"):
        download.safe_extract(archive_path, tmp_path, max_extracted_bytes=1000)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".downloads"]


# --- interrupted runs ------------------------------------------------------------------------------

def test_killed_extraction_is_cleaned_and_redone(server, archives, out_dir):
    download_archives(out_dir, server.base_url, progress=False)
    # what a run killed while extracting CT-0.zip again would leave: a temp folder, no marker
    (out_dir / ".downloads" / "CT-0.zip.done").unlink()
    (out_dir / "CT-0" / "study_0001.nii.gz").unlink()
    leftover = out_dir / ".extract-CT-0.zip-tmp" / "CT-0"
    leftover.mkdir(parents=True)
    (leftover / "study_0001.nii.gz").write_bytes(b"half written")
    # and one from an older killed run, for an archive that is complete and will not be redone
    (out_dir / ".extract-CT-23.zip-tmp").mkdir()
    download_archives(out_dir, server.base_url, progress=False)
    assert sorted(path.name for path in out_dir.iterdir()) == [".downloads", "CT-0", "CT-23"]
    assert (out_dir / ".downloads" / "CT-0.zip.done").exists()
    assert_extracted(out_dir, archives["CT-0.zip"])
    assert server.requests_for("CT-0.zip") == [None, None]
    assert server.requests_for("CT-23.zip") == [None]


def test_verified_archive_without_marker_is_extracted_without_downloading(server, archives, out_dir):
    downloads_dir = out_dir / ".downloads"
    downloads_dir.mkdir(parents=True)
    (downloads_dir / "CT-0.zip").write_bytes((server.root / "CT-0.zip").read_bytes())
    download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert server.requests == []
    assert_extracted(out_dir, archives["CT-0.zip"])


def test_interrupted_move_leaves_no_marker_and_the_rerun_finishes(server, archives, out_dir, monkeypatch):
    real_replace = files.os.replace  # common.files moves each extracted scan into place
    moved_paths = []

    def replace_then_interrupt(source, destination):
        if Path(destination).parent == out_dir / "CT-0":
            if moved_paths:  # the second scan: as if the user pressed Ctrl-C mid-move
                raise KeyboardInterrupt
            moved_paths.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert moved_paths == [out_dir / "CT-0" / "study_0000.nii.gz"]
    assert not (out_dir / ".downloads" / "CT-0.zip.done").exists()
    assert not (out_dir / ".extract-CT-0.zip-tmp").exists()
    download_archives(out_dir, server.base_url, names=("CT-0.zip",), progress=False)
    assert server.requests_for("CT-0.zip") == [None]  # the verified zip was kept, not fetched again
    assert_extracted(out_dir, archives["CT-0.zip"])


def test_download_command_then_build_end_to_end(server, out_dir, tmp_path):
    """The real command in a subprocess, zips of real NIfTI phantoms, then a cache built from them."""
    from conftest import run_python_module
    from preprocess.engine.build import BuildOptions, build_cache
    from preprocess.cache import CacheReader
    from preprocess.phantoms.synth import make_phantom, write_phantom

    for class_name, abnormal in (("CT-0", False), ("CT-23", True)):
        entries = {}
        for study in range(2):
            scan = tmp_path / f"{class_name}_{study}.nii.gz"
            write_phantom(make_phantom(0, study + 10 * abnormal, abnormal, size=32), scan)
            entries[f"{class_name}/study_{study:04d}.nii.gz"] = scan.read_bytes()
        make_zip(server.root / f"{class_name}.zip", entries)
    result = run_python_module("preprocess", "download", "--out", str(out_dir), "--base-url", server.base_url,
                               "--quiet")
    assert result.returncode == 0, result.stderr
    cache = tmp_path / "cache.h5"
    build_cache(BuildOptions(raw=out_dir, out=cache, jobs=1, shape=(16, 16, 8), quiet=True))
    with CacheReader(cache) as reader:
        assert reader.scan_ids == ["CT-0/study_0000", "CT-0/study_0001", "CT-23/study_0000", "CT-23/study_0001"]
        assert reader.labels.tolist() == [0, 0, 1, 1]
    again = run_python_module("preprocess", "download", "--out", str(out_dir), "--base-url", server.base_url)
    assert again.returncode == 0 and "skipping" in again.stderr
    missing = run_python_module("preprocess", "download", "--out", str(tmp_path / "other"),
                                "--base-url", server.base_url + "nothing-here/", "--quiet")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"python -m preprocess: error: could not download {server.base_url}nothing-here/CT-0.zip: HTTP 404 Not Found"]
