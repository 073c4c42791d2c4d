"""Where a training or embedding run spends its time: step time, time waiting for the next batch, ECGs/s, and on CUDA
peak memory and model FLOPs utilisation (MFU). One meter serves every loop of the package (pretraining, fine-tuning,
report LoRA, the embedding command line), so their logs use the same names and the same definitions.

The definitions (per logged interval; `totals()` gives the same over the whole run):

- `seconds_per_step`: wall time of the interval / optimizer steps in it. Evaluation and checkpoint writing are left
  out (`ThroughputMeter.excluded`), so this is what training itself costs.
- `data_wait_seconds_per_step`, `data_wait_fraction`: time the loop spent blocked on the next batch (including the
  DataLoader starting its workers) / steps, and / interval time. A fraction above `DATA_BOUND_FRACTION` means the
  GPU waits for data: raise `dataloader_num_workers`, or store `ecg_values` once (`merit_hf.data.precompute_ecg_values`).
- `ecgs_per_second`: ECGs trained (all processes) / interval time.
- `achieved_tflops`, `mfu`: `ecgs_per_second x flops_per_ecg`, and that / (`peak_tflops x num_processes`). FLOPs per
  ECG are *model* FLOPs: one forward plus the backward to every trainable parameter, counted once by
  `torch.utils.flop_counter` on the run's own first batch (eval mode, so activation checkpointing's recomputation is
  not counted, as MFU is defined by PaLM, arXiv 2204.02311, appendix B). Pretraining pads that batch's reports to
  `--max_report_length` first, so its figure does not depend on which batch comes first (a resumed run's is another).
- `max_memory_allocated_gib` (CUDA): `torch.cuda.max_memory_allocated` over the interval; `peak_memory_gib` in the
  totals is the maximum over the run.

`peak_tflops` defaults to the dense (no sparsity) bf16 tensor-core peak of the GPU, looked up by its name in
`PEAK_DENSE_BF16_TFLOPS`; for other GPUs pass `--peak_tflops` (without it the log has no MFU, and says so once).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core TFLOP/s from the vendor's data sheets (they print the figure with sparsity, twice these).
# Matched in order against the whole words of `torch.cuda.get_device_name()` (split at spaces and hyphens, any case),
# so the more specific names come first, and "L40" is not the L4 nor "A10G" the A10.
PEAK_DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835.0),  # NVIDIA H200 data sheet: BF16 1,671 TFLOPS with sparsity (NVL)
    ("H200", 989.0),  # NVIDIA H200 data sheet: BF16 1,979 TFLOPS with sparsity (SXM)
    ("GH200", 989.0),  # NVIDIA GH200 data sheet: the H100 SXM tensor cores
    ("H100 NVL", 835.0),  # NVIDIA H100 data sheet: BF16 1,671 TFLOPS with sparsity (NVL)
    ("H100 PCIe", 756.0),  # NVIDIA H100 data sheet: BF16 1,513 TFLOPS with sparsity (PCIe)
    ("H100", 989.0),  # NVIDIA H100 data sheet: BF16 1,979 TFLOPS with sparsity (SXM; "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # NVIDIA A100 data sheet: BF16 312 TFLOPS dense, SXM and PCIe
    ("L40S", 362.0),  # NVIDIA L40S data sheet: BF16 733 TFLOPS with sparsity
    ("L40", 181.0),  # NVIDIA L40 data sheet: BF16 362 TFLOPS with sparsity
    ("L4", 121.0),  # NVIDIA L4 data sheet: BF16 242 TFLOPS with sparsity
    ("A10", 125.0),  # NVIDIA A10 data sheet: BF16 250 TFLOPS with sparsity
)
# Above this share of the interval spent waiting for batches, the log says the run is data-bound.
DATA_BOUND_FRACTION = 0.10
GIB = 2**30


def default_peak_tflops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of `device` from `PEAK_DENSE_BF16_TFLOPS`, or `None` (CPU, or a GPU not in the table)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    words = " ".join(re.split(r"[\s-]+", torch.cuda.get_device_name(device).lower()))
    return next((peak for key, peak in PEAK_DENSE_BF16_TFLOPS if f" {key.lower()} " in f" {words} "), None)


def _attention_configs(model: torch.nn.Module) -> list:
    configs = {
        id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")
    }
    return list(configs.values())


def count_flops_per_sample(
    model: torch.nn.Module,
    compute: Callable[[Mapping[str, Any]], torch.Tensor],
    batch: Mapping[str, Any],
    backward: bool = True,
    max_rows: int = 2,
) -> float:
    """FLOPs per sample of `compute(batch)` (a loss, or any output for `backward=False`) and, with `backward`, of the
    gradient to every trainable parameter of `model`, counted by `torch.utils.flop_counter.FlopCounterMode`.

    Counted on the first `max_rows` rows of every tensor in `batch` (FLOPs per sample do not depend on the batch size
    beyond the negligible `batch^2` contrastive logits; padded lengths, e.g. of the reports, are kept). The model runs
    in eval mode with eager attention: FlopCounterMode does not see inside PyTorch's fused CPU attention kernel, and
    eval mode leaves out dropout and the recomputation of activation checkpointing, so the count is model FLOPs
    whatever kernel or memory option the run uses. Gradients are taken with `torch.autograd.grad`, so no `.grad` is
    touched, and the RNG state is restored: the run continues exactly as it would have without the count.
    """
    from torch.utils.flop_counter import FlopCounterMode

    rows = next(value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor) and value.dim() > 0)
    rows = min(rows, max_rows)
    sliced = {k: v[:rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    configs = _attention_configs(model)
    saved_attention = [config._attn_implementation for config in configs]
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    counter = FlopCounterMode(display=False)
    try:
        for config in configs:
            config._attn_implementation = "eager"
        model.eval()
        with torch.random.fork_rng(devices=devices), counter:
            if backward:
                output = compute(sliced)
                parameters = [p for p in model.parameters() if p.requires_grad]
                torch.autograd.grad(output, parameters, allow_unused=True)
            else:
                with torch.no_grad():
                    compute(sliced)
    finally:
        for config, implementation in zip(configs, saved_attention):
            config._attn_implementation = implementation
        model.train(was_training)
    return counter.get_total_flops() / rows


class ThroughputMeter:
    """Measures a training (or embedding) loop per logged interval and over the whole run.

    Hooks: call `start()` right before the loop's first batch (what came before it, model and data set-up, a
    checkpoint to load, trackers, counts in no interval), iterate the batches through `timed(...)` (data wait; or wrap
    the batch preparation in `with meter.waiting():`), call `count_flops_once(...)` with the first batch,
    `step(num_samples)` after each optimizer step, wrap evaluation and checkpoints in `with meter.excluded():`,
    diagnostics the run pays for inside the loop (the per-term gradient norms) in `with meter.diagnostics():` (counted,
    and shown as their own share), and call `interval()` where the loop logs; `totals()` at the end.

    Args:
        device: where the model runs; CUDA adds peak memory and synchronises at interval ends so times are real.
        peak_tflops: the MFU denominator per device; `None` takes `default_peak_tflops(device)`.
        num_processes: devices that train together (MFU divides by `peak_tflops x num_processes`).
        model: the eager model (before `accelerator.prepare` / `torch.compile`) that `count_flops_once` counts on.
    """

    def __init__(
        self,
        device: torch.device | str,
        peak_tflops: float | None = None,
        num_processes: int = 1,
        model: torch.nn.Module | None = None,
    ):
        self.device = torch.device(device)
        self.peak_tflops = peak_tflops if peak_tflops is not None else default_peak_tflops(self.device)
        self.num_processes = num_processes
        self.model = model
        self.flops_per_sample: float | None = None
        self._earlier_flops_per_sample: float | None = None  # an earlier part's count (`add_run_counts`)
        self.postfix: dict[str, str] = {}  # short strings for the progress bar, from the last interval
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._run = {"seconds": 0.0, "data_wait": 0.0, "diagnostics": 0.0, "steps": 0, "samples": 0}
        self._peak_memory = 0
        self._reset_interval(time.perf_counter())
        self.data_bound_warned = False

    # -- hooks --------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the first interval now: the time since the meter was made (set-up) counts in no interval and not in
        the run's totals. Call it right before the loop takes its first batch, so that the first interval measures
        the loop, data waits included, as the later ones do."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self._reset_interval(time.perf_counter())

    def timed(self, batches: Iterable) -> Iterator:
        """Yield from `batches`, adding the time blocked in `iter()` (worker start-up) and `next()` to the data wait."""
        start = time.perf_counter()
        iterator = iter(batches)
        self._interval["data_wait"] += time.perf_counter() - start
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self._interval["data_wait"] += time.perf_counter() - start
                return
            self._interval["data_wait"] += time.perf_counter() - start
            yield batch

    @contextlib.contextmanager
    def waiting(self):
        """Time spent inside counts as waiting for data: for loops that prepare the batch in the loop body (the
        fine-tuning loop runs the feature extractor there)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._interval["data_wait"] += time.perf_counter() - start

    def diagnostics(self):
        """Time spent inside counts in the interval, and also as `diagnostics_seconds_per_step` /
        `diagnostics_fraction`: work the loop does for the log, not for the model."""
        return self._synchronized("diagnostics")

    def count_flops_once(
        self,
        compute: Callable[[Mapping[str, Any]], torch.Tensor],
        batch: Mapping[str, Any],
        backward: bool = True,
    ) -> bool:
        """`count_flops_per_sample` on `self.model` with the first batch, not timed; `True` when it counted (the
        first call), `False` after."""
        if self.flops_per_sample is not None or self.model is None:
            return False
        with self.excluded():
            self.flops_per_sample = count_flops_per_sample(self.model, compute, batch, backward=backward)
        return True

    def step(self, num_samples: int) -> None:
        """One optimizer step (or one inference batch) of `num_samples` samples over all processes is done."""
        self._interval["steps"] += 1
        self._interval["samples"] += num_samples

    def excluded(self):
        """Time spent inside (evaluation, checkpoints, the FLOP count) counts in no interval."""
        return self._synchronized("excluded")

    @contextlib.contextmanager
    def _synchronized(self, account: str):
        """Add the seconds spent inside to the interval's `account`; on CUDA synchronised at both ends, so that the
        GPU work inside is what is counted."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize(self.device)
            self._interval[account] += time.perf_counter() - start

    # -- reports ------------------------------------------------------------------------------------------------------
    def interval(self) -> dict[str, float]:
        """Metrics of the steps since the last call (see the module docstring), and start a new interval."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        seconds = max(now - self._interval["start"] - self._interval["excluded"], 1e-9)
        current = self._interval
        metrics = self._metrics(
            seconds, current["data_wait"], current["steps"], current["samples"], self.flops_per_sample
        )
        metrics.update(self._diagnostics_metrics(seconds, current["diagnostics"], current["steps"]))
        if self._cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            self._peak_memory = max(self._peak_memory, peak)
            metrics["max_memory_allocated_gib"] = peak / GIB
            torch.cuda.reset_peak_memory_stats(self.device)
        for key in ("data_wait", "diagnostics", "steps", "samples"):
            self._run[key] += current[key]
        self._run["seconds"] += seconds
        self._reset_interval(now)
        self.postfix = {"ecg/s": f"{metrics['ecgs_per_second']:.1f}", "data": f"{metrics['data_wait_fraction']:.0%}"}
        if "mfu" in metrics:
            self.postfix["mfu"] = f"{metrics['mfu']:.1%}"
        if "max_memory_allocated_gib" in metrics:
            self.postfix["mem"] = f"{metrics['max_memory_allocated_gib']:.1f}G"
        return metrics

    def run_counts(self) -> dict[str, float]:
        """The whole run's raw counts (seconds, data wait, steps, samples) and its FLOPs per sample, the interval
        still open included without closing it: what a checkpoint keeps, so that a resumed run's `totals()` cover the
        whole run (`add_run_counts`)."""
        counts: dict[str, Any] = dict(self._run)
        counts["flops_per_sample"] = self._flops_per_sample()
        for key in ("data_wait", "diagnostics", "steps", "samples"):
            counts[key] += self._interval[key]
        open_seconds = time.perf_counter() - self._interval["start"] - self._interval["excluded"]
        counts["seconds"] += max(open_seconds, 0.0)
        return counts

    def add_run_counts(self, counts: dict[str, float]) -> None:
        """Add an earlier part of the run (`run_counts` of a checkpoint) to the whole run's counts. Its FLOPs per
        sample stand in for this part's where this part counts none (a finished run resumed trains no batch)."""
        for key in self._run:
            self._run[key] += counts.get(key, 0)
        if counts.get("flops_per_sample") is not None:
            self._earlier_flops_per_sample = counts["flops_per_sample"]

    def totals(self) -> dict[str, float]:
        """The same metrics over the whole run (an interval still open is closed first), plus
        `ecgs_seen`, `measured_seconds`, `limited_by` (`"data"` when the run waited for batches more than
        `DATA_BOUND_FRACTION` of its time, else `"step"`), `flops_per_ecg`, `peak_tflops` and, on CUDA,
        `peak_memory_gib`."""
        if self._interval["steps"]:
            self.interval()
        run = self._run
        flops_per_sample = self._flops_per_sample()
        totals = self._metrics(
            max(run["seconds"], 1e-9), run["data_wait"], run["steps"], run["samples"], flops_per_sample
        )
        totals.update(self._diagnostics_metrics(max(run["seconds"], 1e-9), run["diagnostics"], run["steps"]))
        totals.update(ecgs_seen=run["samples"], measured_seconds=run["seconds"], steps_measured=run["steps"])
        totals["limited_by"] = "data" if totals["data_wait_fraction"] > DATA_BOUND_FRACTION else "step"
        if flops_per_sample is not None:
            totals["flops_per_ecg"] = flops_per_sample
        if self.peak_tflops is not None:
            totals["peak_tflops"] = self.peak_tflops
        if self._cuda:
            totals["peak_memory_gib"] = max(self._peak_memory, torch.cuda.max_memory_allocated(self.device)) / GIB
        return totals

    def data_bound_message(self, metrics: Mapping[str, float]) -> str | None:
        """A one-line diagnosis the first time an interval waited for data more than `DATA_BOUND_FRACTION` of its
        time (the progress bar keeps showing the share after that)."""
        fraction = metrics.get("data_wait_fraction", 0.0)
        if fraction <= DATA_BOUND_FRACTION or self.data_bound_warned:
            return None
        self.data_bound_warned = True
        return (
            f"data-bound: {fraction:.0%} of the last interval waited for the next batch "
            f"({metrics['data_wait_seconds_per_step'] * 1e3:.0f} ms per step); raise --dataloader_num_workers, keep "
            "--dataloader_persistent_workers on, or store ecg_values once (merit_hf.data.precompute_ecg_values)"
        )

    def describe(self) -> str:
        """What the log will show, for the first screen of a run."""
        flops = f"{self.flops_per_sample / 1e9:.1f} GFLOP per ECG" if self.flops_per_sample else "FLOPs not counted"
        if self.peak_tflops is None:
            peak = "no MFU (CPU, or a GPU without a known peak: pass --peak_tflops)"
        else:
            peak = f"MFU against {self.peak_tflops:g} TFLOP/s per device"
        return f"throughput: {flops}; {peak}"

    # -- internals ----------------------------------------------------------------------------------------------------
    def _flops_per_sample(self) -> float | None:
        """This part's count, else an earlier part's (`add_run_counts`)."""
        return self.flops_per_sample if self.flops_per_sample is not None else self._earlier_flops_per_sample

    def _reset_interval(self, now: float) -> None:
        self._interval = {
            "start": now,
            "data_wait": 0.0,
            "diagnostics": 0.0,
            "excluded": 0.0,
            "steps": 0,
            "samples": 0,
        }

    @staticmethod
    def _diagnostics_metrics(seconds: float, diagnostics: float, steps: int) -> dict[str, float]:
        if not diagnostics:
            return {}
        return {
            "diagnostics_seconds_per_step": diagnostics / steps if steps else float("nan"),
            "diagnostics_fraction": min(diagnostics / seconds, 1.0),
        }

    def _metrics(
        self, seconds: float, data_wait: float, steps: int, samples: int, flops_per_sample: float | None
    ) -> dict[str, float]:
        metrics = {
            "seconds_per_step": seconds / steps if steps else float("nan"),
            "data_wait_seconds_per_step": data_wait / steps if steps else float("nan"),
            "data_wait_fraction": min(data_wait / seconds, 1.0),
            "ecgs_per_second": samples / seconds,
        }
        if flops_per_sample is not None:
            metrics["achieved_tflops"] = metrics["ecgs_per_second"] * flops_per_sample / 1e12
            if self.peak_tflops:
                metrics["mfu"] = metrics["achieved_tflops"] / (self.peak_tflops * self.num_processes)
        return metrics


def dataloader_options(
    num_workers: int, pin_memory: bool, persistent_workers: bool, prefetch_factor: int | None, device: torch.device
) -> dict[str, Any]:
    """`DataLoader` keyword arguments for the data path: pinned memory only where a CUDA copy follows; persistent
    workers and the prefetch factor only with workers (PyTorch refuses them with `num_workers=0`)."""
    options: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory and device.type == "cuda"}
    if num_workers > 0:
        options["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            options["prefetch_factor"] = prefetch_factor
    return options


__all__ = [
    "DATA_BOUND_FRACTION",
    "PEAK_DENSE_BF16_TFLOPS",
    "ThroughputMeter",
    "count_flops_per_sample",
    "dataloader_options",
    "default_peak_tflops",
]
