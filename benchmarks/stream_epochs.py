"""Seconds per epoch of a streamed, shuffled Parquet split, by how many shards fill the shuffle buffer at once.

    python benchmarks/stream_epochs.py --ptbxl_root ../shared/data/ptbxl_2k   # -> results/stream_epochs_cpu.json

The split is pretraining's own (`merit_hf.training.pretrain.training_stream`: one process, whole shards, seeded
shuffle with a 10,000-record buffer) over PTB-XL's training folds converted to Parquet at 100 Hz (1,490 records of
ptbxl_2k, one file of 15 row groups), read through a DataLoader with one persistent worker, batches of 64, the
`ecg_id` and `signal` columns only (no feature extractor, no model): what is left is the stream itself.
`--shuffle_buffer_input_shards` 10 is datasets' default for `IterableDataset.shuffle` (`max_buffer_input_shards`),
1 is pretraining's. The settings alternate round by round in one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader

from merit_hf.data import convert_ptbxl, load_dataset
from merit_hf.training.pretrain import DataArguments, training_stream

RESULTS = Path(__file__).parent / "results"


def epoch_seconds(data_dir: Path, input_shards: int, epochs: int) -> tuple[list[float], int]:
    split = load_dataset("ptbxl", data_dir, split="train", streaming=True).select_columns(["ecg_id", "signal"])
    arguments = DataArguments(dataloader_num_workers=1, shuffle_buffer_input_shards=input_shards)
    stream = training_stream(split, 0, 1, arguments, seed=0).with_format("torch")
    loader = DataLoader(stream, batch_size=64, num_workers=1, persistent_workers=True)
    seconds = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        start = time.perf_counter()
        records = sum(len(batch["ecg_id"]) for batch in loader)
        seconds.append(round(time.perf_counter() - start, 3))
    del loader
    return seconds, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptbxl_root", required=True, help="PhysioNet PTB-XL folder (converted here to Parquet)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS / "stream_epochs_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        convert_ptbxl(args.ptbxl_root, folder)
        runs = []
        for round_index in range(args.rounds):
            for input_shards in (10, 1):
                seconds, records = epoch_seconds(Path(folder), input_shards, args.epochs)
                runs.append({"round": round_index, "shuffle_buffer_input_shards": input_shards, "records": records,
                             "epoch_seconds": seconds})  # fmt: skip
                print(runs[-1], flush=True)
    result = {
        "benchmark": "stream_epochs",
        "command": "python benchmarks/stream_epochs.py --ptbxl_root " + args.ptbxl_root,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "datasets": datasets.__version__,
            "threads": 1,
            "dataloader_workers": 1,
        },  # fmt: skip
        "datasets_wait_on_thread_shutdown_s": datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN,
        "runs": runs,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.output)


if __name__ == "__main__":
    main()
