"""The benchmarks' shared harness: timing with device syncs, peak memory, machine info, JSON records, tables.

Each benchmark in bench/ measures a shipped path against the plain fp32 path of the same run and prints the ratio,
so a figure never depends on a number from another machine or another day.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch

from ddim.models import unet_kwargs_from_config

# a U-Net of the paper's family small enough for a CPU smoke run (seconds)
TINY_UNET = dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                 in_channels=3, resolution=16, resamp_with_conv=True)


def unet_config(tiny: bool) -> dict:
    """The official CIFAR-10 U-Net's kwargs (35.7 M parameters), or TINY_UNET."""
    return dict(TINY_UNET) if tiny else unet_kwargs_from_config("cifar10")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on a CPU, where calls return when done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn``, the device drained before and after each, so a
    figure holds the work queued by the call and nothing before it."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device | str) -> float | None:
    """Peak GPU memory allocated by tensors since the last reset; None on a CPU (no such statistic)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def device_info(device: torch.device | str) -> dict:
    """What the figures were measured on: versions, GPU model and memory, or the CPU and its threads."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def add_ratios(rows: list[dict], key: str, baseline_row: int | None = 0, out: str = "ratio") -> None:
    """Set each row's ``out`` to its ``key`` over the baseline row's (an index into ``rows``; None, or a missing
    figure, gives None rather than a guess), so every benchmark states its gain against the fp32 path of the same
    run."""
    base = rows[baseline_row].get(key) if baseline_row is not None else None
    for row in rows:
        value = row.get(key)
        row[out] = value / base if value is not None and base else None


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a record: ``python bench/<script> <args>``."""
    return " ".join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_json(record: dict, path: str | Path | None) -> None:
    """Write a benchmark record (a no-op without a path), so runs can be compared later."""
    if path:
        Path(path).write_text(json.dumps(record, indent=1, default=str))


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are (key, header, format spec); a missing or None value prints as '-', and a
    '|' in a header (``mean |d|``) is escaped so it stays inside its cell."""
    head = "| " + " | ".join(header.replace("|", "\\|") for _, header, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    lines = [head, rule]
    for row in rows:
        cells = ["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class StepTimer(L.Callback):
    """Times a Lightning fit's steps after ``warmup`` untimed ones (compilation, CUDA-graph capture), the device
    drained at both ends: ``it_per_s`` is the whole training loop's rate, data loading and logging included."""

    def __init__(self, warmup: int):
        self.warmup, self.batches, self.start, self.seconds = warmup, 0, None, None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: object, batch_idx: int) -> None:
        if self.batches == self.warmup:
            synchronize(module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        self.batches += 1
        if self.start is not None:
            synchronize(module.device)
            self.seconds = time.perf_counter() - self.start

    @property
    def it_per_s(self) -> float | None:
        timed_steps = self.batches - self.warmup
        return timed_steps / self.seconds if self.seconds and timed_steps > 0 else None
