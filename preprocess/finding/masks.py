"""Find each scan's lesion mask: MosMedData's `masks/<study>_mask.nii.gz` beside the scans.

MosMedData ships voxel masks of the findings for 50 of its CT-1 studies, one NIfTI file per study,
named for it (`study_0255.nii.gz` -> `study_0255_mask.nii.gz`), on the scan's grid; `synth
--masks` writes its phantoms' masks the same way. `build` looks for them in `--masks FOLDER`, or
in `<raw>/masks` when that folder exists. A mask is matched to a NIfTI scan by its file name
(`<name>_mask.nii[.gz]` or `<name>.nii[.gz]`); a DICOM series gets none. A scan with no mask file
is cached without one: the training that uses masks (`fit --lesion-weight`) learns from the masks
it has, and knows a normal scan has no lesion.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from common.errors import UserError
from preprocess.finding.sources import MaskFile, Source, scan_stem, visible_files

MASK_SUFFIX = "_mask"
DEFAULT_FOLDER = "masks"  # under --raw


def masks_folder(raw: Path, masks: Path | None) -> Path | None:
    """The folder to look in: `masks` if given (it must exist), else `<raw>/masks` if it exists."""
    if masks is not None:
        if not Path(masks).is_dir():
            raise UserError(f"--masks {masks}: no such folder")
        return Path(masks)
    default = Path(raw) / DEFAULT_FOLDER
    return default if default.is_dir() else None


def attach_masks(sources: list[Source], folder: Path | None) -> list[Source]:
    """The sources, each NIfTI scan with its mask file from `folder` when there is one.

    Two mask files for one scan name (a.nii and a_mask.nii.gz) are one line's refusal: which one
    the user meant is not ours to guess.
    """
    if folder is None:
        return sources
    found: dict[str, MaskFile] = {}
    for path in visible_files(folder):
        stem = scan_stem(path.name)
        if stem is None:
            continue
        name = stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else stem
        stat = path.stat()
        mask = MaskFile(path, path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns)
        if name in found:
            raise UserError(f"two lesion masks for scans named {name} in {folder}: {found[name].relative_path} "
                            f"and {mask.relative_path}; keep one")
        found[name] = mask
    attached = []
    for source in sources:
        stem = None if source.series_files else scan_stem(source.path.name)
        attached.append(replace(source, mask=found.get(stem)) if stem in found else source)
    return attached
