"""`bench-input`: throughput of the training input pipeline alone (read, rotate, batch; no model)."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError
from common.processes import peak_rss_bytes
from preprocess.cache import CacheReader
from train.tensorflow_import import load_tensorflow
from train.options import MAX_BENCH_SAMPLES, WHOLE_NUMBER_RANGES

log = logging.getLogger(__name__)

WARMUP_BATCHES = 3  # tracing the graph and filling the prefetch buffer are not throughput


@dataclass(frozen=True)
class InputBenchmark:
    samples: int
    seconds: float
    peak_rss_bytes: int

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds


def benchmark_input(cache: Path, samples: int = 200, batch_size: int = 2, seed: int = 0) -> InputBenchmark:
    """Time `samples` training samples through `make_training_dataset`, after a short warm-up."""
    for flag, value, (low, high) in (("--samples", samples, (1, MAX_BENCH_SAMPLES)),
                                     ("--batch-size", batch_size, WHOLE_NUMBER_RANGES["batch_size"]),
                                     ("--seed", seed, WHOLE_NUMBER_RANGES["seed"])):
        if not isinstance(value, int) or not low <= value <= high:
            raise UserError(f"{flag} must be a whole number from {low} to {high}, got {value!r}")
    with CacheReader(cache) as reader:
        load_tensorflow()  # only once the cache checks out
        from train.pipeline.data import make_training_dataset, reporting_read_failures
        from train.pipeline.folds import split_rows

        rows, labels = split_rows(reader, "train")
        if len(rows) == 0:
            raise UserError(f"{cache}: the train split is empty")
        # epochs end with padded batches, so count samples, plus one spare epoch
        epochs = -(-(samples + WARMUP_BATCHES * batch_size) // len(rows)) + 1
        dataset = make_training_dataset(reader, rows, labels, batch_size, seed, epochs=epochs)
        with reporting_read_failures():
            return time_batches(iter(dataset), samples)


def time_batches(batches: Iterator, samples: int) -> InputBenchmark:
    """Time `samples` samples of `batches` (a batch's first element holds them), after WARMUP_BATCHES batches."""
    for _ in range(WARMUP_BATCHES):
        next(batches)
    counted = 0
    start = time.perf_counter()
    while counted < samples:
        volumes, *_ = next(batches)
        counted += int(volumes.shape[0])
    seconds = time.perf_counter() - start
    return InputBenchmark(samples=counted, seconds=seconds, peak_rss_bytes=peak_rss_bytes())


def format_benchmark(result: InputBenchmark) -> str:
    """The benchmark's last line: '<number> samples/s' and the peak RSS."""
    return f"{result.samples_per_second:.1f} samples/s, peak RSS {result.peak_rss_bytes / 2**20:.0f} MiB"
