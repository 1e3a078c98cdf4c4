"""Where a trained OxygenREC fast path loses: the generator's beam ranking vs its own encoder.

On the first N homepage rows of the ML-1M test split, for a checkpoint trained with dense rows
(``window_len > 0``): HR@10 of the trie-constrained beam search (beam 20, the reported ranking),
HR@10 of the encoder's last-slot state scored against every item representation (what the
auxiliary ``item_loss`` head trains; a diagnostic, never a reported ranking), and how often the
target's level-1 code is in the decoder's top 5. If the encoder's own ranking is weak, the gap is
in how the encoder trains, not in SID decoding.

    python bench/oxygen_probe.py outputs/<date>/<time>/checkpoints/best-epoch004.ckpt
"""

from __future__ import annotations

import argparse
import json

import torch
from omegaconf import OmegaConf

from nestrec.oxygen.data import OxygenDataModule
from nestrec.oxygen.module import OxygenPretrainModule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--beams", default="20", help="beam widths to rank with, e.g. 20,50,100")
    args = parser.parse_args()
    config = OmegaConf.load(_run_config(args.checkpoint))
    data = {k: v for k, v in OmegaConf.to_container(config.data, resolve=True).items() if k != "_target_"}
    dm = OxygenDataModule(**data)
    dm.prepare_data()
    dm.setup()
    kwargs = dm.model_kwargs()
    module = OxygenPretrainModule.load_from_checkpoint(
        args.checkpoint, map_location="cpu", registry_state=kwargs["registry_state"],
        genre_item_mask=kwargs["genre_item_mask"],
    ).eval()  # fmt: skip
    test = dm._tensors["test"]
    rows = (test["scenario"] == 0).nonzero().flatten()[: args.rows]
    widths = [int(w) for w in args.beams.split(",")]
    beam = dict.fromkeys(widths, 0)
    encoder = level1 = 0
    with torch.no_grad():
        catalogue = module.model.item_repr(torch.arange(1, module.num_items + 1))
        for start in range(0, len(rows), 250):
            batch = dm.collate_fn(
                [{k: v[j] for k, v in test.items()} for j in rows[start : start + 250].tolist()]
            )
            target = batch["target"].unsqueeze(1)
            for width in widths:
                items, _ = module.recommend(batch, width, 10)
                beam[width] += (items[:, :10] == target).any(1).sum().item()
            state = module.model.encode_window(batch)["states"][:, -1]
            encoder += ((state @ catalogue.t()).topk(10).indices + 1 == target).any(1).sum().item()
            logits = module.model.next_logits(
                module.model.encode(batch), torch.zeros(len(target), 0, dtype=torch.long)
            )
            level1 += (
                (logits.topk(5).indices == module.model.sid_codes[batch["target"], :1]).any(1).sum().item()
            )
    n = len(rows)
    print(json.dumps({"rows": n, **{f"beam{w}_hr@10": round(hits / n, 4) for w, hits in beam.items()},
                      "encoder_state_hr@10": round(encoder / n, 4), "level1_in_top5": round(level1 / n, 4)}))  # fmt: skip


def _run_config(checkpoint: str) -> str:
    from pathlib import Path

    for parent in Path(checkpoint).resolve().parents:
        for name in (".hydra/config.yaml", "config.yaml"):
            if (parent / name).exists():
                return str(parent / name)
    raise SystemExit(f"no Hydra config.yaml above {checkpoint}")


if __name__ == "__main__":
    main()
