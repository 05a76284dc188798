"""Download the Keras tutorial's MosMedData subset (CT-0.zip, CT-23.zip) and extract it safely.

Layout of the output folder OUT:
- `OUT/.downloads/NAME.part` is a download in progress; a rerun continues it with an HTTP Range.
- `OUT/.downloads/NAME` is a downloaded and verified archive, deleted once it is extracted.
- `OUT/.downloads/NAME.done` is the completion marker (JSON: the archive's sha256 and the files
  it produced). It is written last, so anything without a marker is redone by the next run.
- Each zip entry is extracted to the path it names, relative to OUT: `CT-0/a.nii.gz` becomes
  `OUT/CT-0/a.nii.gz`, and `MosMedData/CT-0/a.nii.gz` becomes `OUT/MosMedData/CT-0/a.nii.gz`.
  Entries go first into `OUT/.extract-NAME-tmp` and are moved into place when all are written.
An archive that fails verification or the safety checks is deleted and nothing of it is extracted.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
import shutil
import stat
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from common.errors import UserError
from common.files import move_into_place, write_text_atomically

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://github.com/hasibzunair/3D-image-classification-tutorial/releases/download/v0.2/"
ARCHIVE_NAMES = ("CT-0.zip", "CT-23.zip")
DOWNLOADS_FOLDER_NAME = ".downloads"
TIMEOUT_SECONDS = 60
CHUNK_BYTES = 1024 * 1024
# Compressed NIfTI barely compresses further; 200:1 on a member over 1 MiB means a zip bomb.
MAX_COMPRESSION_RATIO = 200
RATIO_CHECK_MIN_BYTES = 1024**2


def download_archives(out_dir: Path, base_url: str = DEFAULT_BASE_URL, names: tuple[str, ...] = ARCHIVE_NAMES,
                      expected_sha256: dict[str, str] | None = None, progress: bool = True,
                      max_extracted_bytes: int = 20 * 1024**3) -> list[Path]:
    """Download, verify and safely extract each archive into out_dir; return the extracted class folders."""
    out_dir = Path(out_dir)
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise UserError(f"unsupported URL {base_url!r}: the base URL must start with http:// or https://")
    for name in names:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise UserError(f"bad archive name {name!r}: expected a plain file name such as CT-0.zip")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} is a file, not a folder")
    try:
        (out_dir / DOWNLOADS_FOLDER_NAME).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {out_dir}: {error}") from error
    for leftover in out_dir.glob(".extract-*-tmp"):  # from a run killed while extracting
        log.info("removing unfinished extraction %s", leftover)
        shutil.rmtree(leftover)
    class_folders = set()
    for name in names:
        url = base_url.rstrip("/") + "/" + name
        extracted_files = download_archive(out_dir, name, url, (expected_sha256 or {}).get(name),
                                           progress, max_extracted_bytes)
        class_folders |= {(out_dir / relative).parent for relative in extracted_files}
    return sorted(class_folders)


def download_archive(out_dir: Path, name: str, url: str, expected_sha256: str | None, progress: bool,
                     max_extracted_bytes: int) -> dict[str, int]:
    """Bring one archive to the extracted-and-marked state; return {extracted path: bytes}."""
    downloads_dir = out_dir / DOWNLOADS_FOLDER_NAME
    marker_path = downloads_dir / f"{name}.done"
    extracted_files = read_marker(marker_path, out_dir, expected_sha256)
    if extracted_files is not None:
        log.info("%s is already downloaded and extracted in %s; skipping it", name, out_dir)
        return extracted_files
    archive_path = downloads_dir / name
    digest = None
    if archive_path.exists():  # downloaded by a run that was killed before extraction finished
        try:
            digest = verify_zip(archive_path, name, expected_sha256, max_extracted_bytes)
        except UserError as error:
            log.warning("%s; downloading it again", error)
    if digest is None:
        part_path = downloads_dir / f"{name}.part"
        fetch_with_resume(url, part_path, progress)
        digest = verify_zip(part_path, name, expected_sha256, max_extracted_bytes)
        move_into_place(part_path, archive_path)
    extracted_files = safe_extract(archive_path, out_dir, max_extracted_bytes)
    write_text_atomically(marker_path, json.dumps({"archive": name, "sha256": digest, "files": extracted_files}))
    archive_path.unlink()  # the extracted scans are the data; keeping the zip would double the disk use
    log.info("extracted %s (%d files) into %s", name, len(extracted_files), out_dir)
    return extracted_files


def read_marker(marker_path: Path, out_dir: Path, expected_sha256: str | None) -> dict[str, int] | None:
    """Return the files a completed extraction produced, or None when it must be redone."""
    try:
        marker = json.loads(marker_path.read_text())
        files = {str(relative): int(size) for relative, size in marker["files"].items()}
        digest = str(marker["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if expected_sha256 and digest != expected_sha256.lower():
        return None
    for relative, size_bytes in files.items():
        path = out_dir / relative
        if not path.is_file() or path.stat().st_size != size_bytes:
            return None
    return files


def fetch_with_resume(url: str, part_path: Path, progress: bool = True) -> int:
    """Download url into part_path, continuing after any bytes already there; return the size in bytes."""
    response, offset_bytes, total_bytes = open_download(url, part_path)
    if response is None:
        return offset_bytes
    with response, open(part_path, "ab" if offset_bytes else "wb") as part_file, \
            tqdm(total=total_bytes, initial=offset_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part_path.name.removesuffix(".part"), disable=not progress) as progress_bar:
        try:
            while chunk := response.read(CHUNK_BYTES):
                part_file.write(chunk)
                progress_bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as error:
            raise UserError(f"download of {url} was interrupted ({describe(error)}); "
                            "run again to resume") from error
    size_bytes = part_path.stat().st_size
    if total_bytes is not None and size_bytes < total_bytes:
        raise UserError(f"download of {url} is incomplete ({size_bytes} of {total_bytes} bytes); "
                        "run again to resume")
    if total_bytes is not None and size_bytes > total_bytes:
        part_path.unlink()
        raise UserError(f"size mismatch for {url}: got {size_bytes} bytes, expected {total_bytes}")
    return size_bytes


def open_download(url: str, part_path: Path):
    """Open url for the bytes after those in part_path; return (response, offset, total bytes or None).

    The response is None when part_path already holds the whole file.
    """
    offset_bytes = part_path.stat().st_size if part_path.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "mosmed3d-downloader"})
    if offset_bytes:
        request.add_header("Range", f"bytes={offset_bytes}-")
        log.info("resuming %s at byte %d", url, offset_bytes)
    else:
        log.info("downloading %s", url)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset_bytes:  # asked to start at or past the end of the file
            match = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", "").strip())
            if match and int(match.group(1)) == offset_bytes:
                return None, offset_bytes, offset_bytes
            return restart_download(url, part_path)
        raise UserError(f"could not download {url}: HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise UserError(f"could not download {url}: {describe(error.reason)}") from error
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise UserError(f"could not download {url}: {describe(error)}") from error
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "").strip()
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
        if not match or int(match.group(1)) != offset_bytes:
            response.close()
            if not offset_bytes:
                raise UserError(f"could not download {url}: partial answer ({content_range!r}) "
                                "to a request for the whole file")
            return restart_download(url, part_path)
        return response, offset_bytes, None if match.group(3) == "*" else int(match.group(3))
    if offset_bytes:
        log.info("the server sent all of %s instead of the rest; starting over", url)
    length = response.headers.get("Content-Length")
    return response, 0, int(length) if length and length.isdigit() else None


def restart_download(url: str, part_path: Path):
    """Throw away a partial download the server will not continue, and ask for the whole file."""
    log.info("the server cannot continue %s from the partial download; starting over", url)
    part_path.unlink(missing_ok=True)
    return open_download(url, part_path)


def describe(error: object) -> str:
    """One-line text for a network error; timeouts say how long was waited."""
    if isinstance(error, TimeoutError):
        return f"no answer within {TIMEOUT_SECONDS} s (timed out)"
    return str(error) or type(error).__name__


def verify_zip(archive_path: Path, name: str, expected_sha256: str | None, max_extracted_bytes: int) -> str:
    """Check the checksum, the members and every member's CRC; delete the file and raise if bad."""
    digest = hashlib.sha256()
    with open(archive_path, "rb") as archive_file:
        while chunk := archive_file.read(CHUNK_BYTES):
            digest.update(chunk)
    try:
        if expected_sha256 and digest.hexdigest() != expected_sha256.lower():
            raise UserError(f"checksum mismatch for {name}: sha256 is {digest.hexdigest()}, "
                            f"expected {expected_sha256}")
        try:
            with zipfile.ZipFile(archive_path) as archive:
                check_members(archive, name, max_extracted_bytes)  # before testzip inflates a bomb
                bad_member = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as error:
            raise UserError(f"corrupt zip {name}: {error}") from error
        if bad_member is not None:
            raise UserError(f"corrupt zip {name}: CRC check failed for {bad_member}")
    except UserError:
        archive_path.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def check_members(archive: zipfile.ZipFile, name: str, max_extracted_bytes: int) -> list[zipfile.ZipInfo]:
    """Refuse unsafe entries (escaping paths, symlinks, encryption, bombs); return the entries."""
    total_bytes = 0
    for info in archive.infolist():
        entry = info.filename.replace("\\", "/")
        parts = PurePosixPath(entry).parts
        if entry.startswith("/") or re.match(r"[A-Za-z]:", entry) or not parts:
            raise UserError(f"unsafe zip {name}: absolute path entry {info.filename!r}")
        if ".." in parts:  # refused even when it stays inside OUT: no real archive needs it
            raise UserError(f"unsafe zip {name}: entry {info.filename!r} contains '..'")
        if parts[0] == DOWNLOADS_FOLDER_NAME or parts[0].startswith(".extract-"):
            raise UserError(f"unsafe zip {name}: entry {info.filename!r} would overwrite "
                            "download bookkeeping")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UserError(f"unsafe zip {name}: symbolic link entry {info.filename!r}")
        if info.flag_bits & 0x1:
            raise UserError(f"unsupported zip {name}: entry {info.filename!r} is encrypted")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise UserError(f"unsafe zip {name}: entry {info.filename!r} compresses more than "
                            f"{MAX_COMPRESSION_RATIO}:1 (zip bomb?)")
        total_bytes += info.file_size
    if total_bytes > max_extracted_bytes:
        raise UserError(f"unsafe zip {name}: it would extract to {total_bytes} bytes, "
                        f"more than the limit of {max_extracted_bytes}")
    return archive.infolist()


def safe_extract(archive_path: Path, out_dir: Path, max_extracted_bytes: int) -> dict[str, int]:
    """Extract via a temporary folder, then move the files into out_dir; return {relative path: bytes}."""
    name = archive_path.name
    temporary_dir = out_dir / f".extract-{name}-tmp"
    shutil.rmtree(temporary_dir, ignore_errors=True)
    extracted_files: dict[str, int] = {}
    try:
        with zipfile.ZipFile(archive_path) as archive:
            written_total_bytes = 0
            for info in check_members(archive, name, max_extracted_bytes):
                relative = PurePosixPath(info.filename.replace("\\", "/")).as_posix()
                target = temporary_dir / relative
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                written_bytes = 0
                with archive.open(info) as source, open(target, "wb") as destination:
                    # declared sizes can lie, so count what actually comes out
                    while chunk := source.read(CHUNK_BYTES):
                        written_bytes += len(chunk)
                        if (written_bytes > info.file_size
                                or written_total_bytes + written_bytes > max_extracted_bytes):
                            raise UserError(f"unsafe zip {name}: {info.filename!r} inflates to more "
                                            "than it declares")
                        destination.write(chunk)
                written_total_bytes += written_bytes
                extracted_files[relative] = written_bytes
        for relative in extracted_files:
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            move_into_place(temporary_dir / relative, out_dir / relative)
    except UserError:
        archive_path.unlink(missing_ok=True)
        raise
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise UserError(f"could not extract {name} into {out_dir}: {error}") from error
    finally:
        shutil.rmtree(temporary_dir, ignore_errors=True)
    return extracted_files
