"""`info`: a plain-text summary of a cache: counts, shape, options and failures."""
from __future__ import annotations

from collections import Counter

from preprocess.cache import SPLIT_NAMES, CacheReader


def describe_cache(reader: CacheReader) -> str:
    """Counts per class and per split, the preprocessing options, and every failed file."""
    attrs = reader.attributes
    labels = reader.labels
    class_names = reader.class_names
    lines = [
        f"cache        {reader.path}",
        f"format       {attrs['format']} schema {attrs['schema_version']} "
        f"(package {attrs.get('package_version', '?')}, created {attrs.get('created_utc', '?')})",
        f"fingerprint  {reader.fingerprint}",
        f"scans        {len(reader)}  (normal {int((labels == 0).sum())}, abnormal {int((labels == 1).sum())})",
        "classes      " + ", ".join(f"{name} {count}" for name, count in sorted(Counter(class_names).items())),
        f"shape        {' x '.join(map(str, reader.shape))} float32 in [0, 1]",
        f"HU window    [{attrs['hu_min']:g}, {attrs['hu_max']:g}]",
        f"orientation  {attrs['orientation']}",
        f"resampling   {attrs['resample_method']}",
        f"splits       seed {attrs['seed']}, val {attrs['val_fraction']:g}, test {attrs['test_fraction']:g}",
        "scan stats   " + ("raw-HU histogram, spacing, field of view, slices, lung fraction per scan"
                           if reader.has_scan_stats else
                           f"none (a version-{reader.schema_version} cache: predict's histogram and geometry checks "
                           "are unavailable for runs trained on it; rebuild with `build --force`)"),
        "crop         " + (f"each scan's lungs' box ({attrs.get('lung_method', '?')})"
                           if reader.preprocessing.crop == "lungs" else "none: whole scans"),
        "lungs        " + describe_lungs(reader),
        "lesion masks " + describe_masks(reader),
    ]
    for name in SPLIT_NAMES:
        rows = reader.split(name)
        split_labels = labels[rows]
        lines.append(
            f"  {name:<5}      {len(rows):>5}  (normal {int((split_labels == 0).sum())}, "
            f"abnormal {int((split_labels == 1).sum())})"
        )
    failures = reader.failures()
    lines.append(f"failures     {len(failures)}")
    lines += [f"  {failure.source_path}: {failure.reason}" for failure in failures]
    return "\n".join(lines)


def describe_lungs(reader: CacheReader) -> str:
    """How many scans had lungs found, one or two, and their volumes; or why the cache cannot say."""
    if not reader.has_lungs:
        return (f"not searched (a version-{reader.schema_version} cache, built before the lung crop: it holds "
                "whole scans and trains as it is; `build --force` adds the lungs and the crop)")
    stats = reader.scan_stats() or []
    found = [item for item in stats if item.lung_count]
    two = sum(1 for item in found if item.lung_count == 2)
    text = f"found in {len(found)} of {len(stats)} scans (two lungs in {two}, one in {len(found) - two})"
    if found:
        volumes = sorted(item.lung_volume_ml for item in found)
        text += f"; lung volume {volumes[0]:.0f}-{volumes[-1]:.0f} mL, median {volumes[len(volumes) // 2]:.0f}"
    return text


def describe_masks(reader: CacheReader) -> str:
    """How many rows carry a lesion mask, and how many of them are abnormal; or why none can."""
    if reader.schema_version < 4:
        return f"none (a version-{reader.schema_version} cache, from before lesion masks)"
    masked = reader.lesion_mask_rows
    if not masked.any():
        return "none (`build` found no masks; docs/your-data.md, \"Lesion masks\")"
    abnormal = int((masked & (reader.labels == 1)).sum())
    return f"{int(masked.sum())} of {len(masked)} scans ({abnormal} abnormal): `fit` learns where lesions are"
