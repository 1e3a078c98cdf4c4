"""OxygenREC pre-training throughput: training targets per second, one-target rows vs dense rows.

Both modes train the same model configuration on the same ML-1M data module (the recipe's
defaults unless overridden); their optimizer steps are *interleaved* one chunk at a time, so
machine noise hits both alike. Reported: median seconds per step, targets per step, targets/s,
and the dense/single ratio of targets/s. A target is one next-item SID sequence the loss trains.

    python bench/oxygen_throughput.py                    # ~3 min on 2 CPUs (after data set-up)
    python bench/oxygen_throughput.py --steps 40 --out bench/results/oxygen_throughput.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nestrec.oxygen.data import OxygenDataModule
from nestrec.oxygen.module import OxygenPretrainModule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="ml-1m")
    parser.add_argument("--steps", type=int, default=24, help="measured steps per mode (after 3 warm-up)")
    parser.add_argument("--chunk", type=int, default=4, help="steps of one mode before switching")
    parser.add_argument("--single-batch", type=int, default=256, help="one-target pairs per step")
    parser.add_argument("--dense-batch", type=int, default=32, help="dense rows (users) per step")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = OxygenDataModule(
        dataset=args.dataset, samples_per_user=48, dense_windows=1, batch_size=args.dense_batch
    )
    dm.prepare_data()
    dm.setup()
    modes = {}
    for mode, rows, batch in (
        ("single", "train_pairs", args.single_batch),
        ("dense", "train", args.dense_batch),
    ):
        # single: the one-target encoder ([profile; 20 recent; IGR picks], encoder_window 0) on pairs;
        # dense: the causal window encoder on dense rows, with the recipe's auxiliary item loss,
        # state-reading decoder and SID distillation (conf/recipe/oxygenrec_pretrain.yaml).
        dense = {"item_loss": 0.5, "decoder_reads_state": True, "sid_distill": 0.5}
        kwargs = {**dm.model_kwargs(), **({"encoder_window": 0} if mode == "single" else dense)}
        module = OxygenPretrainModule(**kwargs)
        dm.train_rows, dm.hparams.batch_size = rows, batch
        modes[mode] = {
            "module": module,
            "optimizer": torch.optim.AdamW(module.parameters(), lr=2e-3),
            "batches": iter(dm.train_dataloader()),
            "seconds": [],
            "targets": [],
        }

    def step(mode: str, record: bool) -> None:
        state = modes[mode]
        batch = next(state["batches"])
        started = time.perf_counter()
        out = state["module"].losses(batch)
        state["optimizer"].zero_grad()
        out["loss"].backward()
        state["optimizer"].step()
        if record:
            state["seconds"].append(time.perf_counter() - started)
            state["targets"].append(float(out["targets"]))

    for mode in modes:
        for _ in range(3):
            step(mode, record=False)
    done = 0
    while done < args.steps:
        for mode in modes:
            for _ in range(min(args.chunk, args.steps - done)):
                step(mode, record=True)
        done += min(args.chunk, args.steps - done)
    result = {"dataset": args.dataset, "steps": args.steps, "torch_threads": torch.get_num_threads()}
    for mode, state in modes.items():
        per_second = [t / s for t, s in zip(state["targets"], state["seconds"])]
        result[mode] = {
            "batch": args.single_batch if mode == "single" else args.dense_batch,
            "step_s_median": round(statistics.median(state["seconds"]), 4),
            "step_s_iqr": [round(q, 4) for q in statistics.quantiles(state["seconds"], n=4)[::2]],
            "targets_per_step": round(statistics.median(state["targets"]), 1),
            "targets_per_s_median": round(statistics.median(per_second), 1),
        }
    result["dense_over_single_targets_per_s"] = round(
        result["dense"]["targets_per_s_median"] / result["single"]["targets_per_s_median"], 2
    )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
