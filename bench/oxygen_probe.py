"""Where a trained OxygenREC fast path loses: the generator's beam ranking vs its own encoder.

On the first N test rows of each scenario of the ML-1M test split, for a checkpoint trained with
dense rows (``window_len > 0``):

- ``beam{W}_hr@10``: HR@10 of the trie-constrained beam search (beam 20 is the reported ranking);
- ``encoder_state_hr@10``: the encoder's last-slot state scored against every item
  representation (what the auxiliary ``item_loss`` head trains; a diagnostic, never reported);
- ``teacher_beam_hr@10``: the same beam search driven by the item head's SID marginals instead of
  the decoder (each level's log-mass of the items under every child of the prefix). Equal to the
  encoder state's HR means beam search and the trie lose nothing; the decoder then loses exactly
  ``teacher_beam - beam``;
- ``level1_in_top5`` for the decoder and the teacher, and each level's teacher-forced NLL and
  accuracy of the target's code for both (which level loses).

Channel rows are scored inside their genre, as the reported ranking is.

    python bench/oxygen_probe.py outputs/<date>/<time>/checkpoints/best-epoch004.ckpt
    python bench/oxygen_probe.py CKPT --rows 1000 --scenarios homepage,channel,related --beams 20,50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from nestrec.data.scenarios import SCENARIO_KINDS
from nestrec.oxygen.data import OxygenDataModule
from nestrec.oxygen.decoding import constrained_beam_search, items_from_beams
from nestrec.oxygen.module import OxygenPretrainModule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint")
    parser.add_argument("--rows", type=int, default=1000, help="test rows per scenario")
    parser.add_argument("--beams", default="20", help="beam widths to rank with, e.g. 20,50,100")
    parser.add_argument("--scenarios", default="homepage", help="e.g. homepage,channel,related")
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
    report = {}
    for scenario in args.scenarios.split(","):
        report[scenario] = _probe(module, dm, SCENARIO_KINDS.index(scenario), args.rows, args.beams)
        print(json.dumps({scenario: report[scenario]}), flush=True)


@torch.no_grad()
def _probe(module: OxygenPretrainModule, dm: OxygenDataModule, scenario: int, limit: int, beams: str) -> dict:
    test = dm._tensors["test"]
    rows = (test["scenario"] == scenario).nonzero().flatten()[:limit]
    widths = [int(w) for w in beams.split(",")]
    model, trie = module.model, module.trie
    node_items = trie.node_items.to_dense()  # [nodes, items + 1]
    catalogue = model.item_repr(torch.arange(1, module.num_items + 1))
    hits = dict.fromkeys(
        [f"beam{w}_hr@10" for w in widths] + ["encoder_state_hr@10", "teacher_beam_hr@10"], 0
    )
    level1 = {"decoder": 0, "teacher": 0}
    depth = len(model.vocab_sizes)
    nll = {who: [0.0] * depth for who in ("decoder", "teacher")}
    correct = {who: [0] * depth for who in ("decoder", "teacher")}
    for start in range(0, len(rows), 250):
        batch = dm.collate_fn(
            [{k: v[j] for k, v in test.items()} for j in rows[start : start + 250].tolist()]
        )
        target = batch["target"]
        mask = module.candidate_mask(batch)
        for width in widths:
            items, _ = module.recommend(batch, width, 10, mask)
            hits[f"beam{width}_hr@10"] += (items[:, :10] == target.unsqueeze(1)).any(1).sum().item()
        encoded = model.encode(batch)
        logits = encoded["slot_state"] @ catalogue.t()
        if mask is not None:
            logits = logits.masked_fill(~mask[:, 1:], float("-inf"))
        top = logits.topk(10).indices + 1
        hits["encoder_state_hr@10"] += (top == target.unsqueeze(1)).any(1).sum().item()
        mass = F.pad(logits.softmax(-1), (1, 0)) @ node_items.t()  # [B, nodes]

        def teacher(rows_: torch.Tensor, prefix: torch.Tensor, mass=mass) -> torch.Tensor:
            node = torch.zeros(len(rows_), dtype=torch.long)
            for level in range(prefix.shape[1]):
                node = trie.child[node, prefix[:, level]]
            children = trie.child[node]
            value = mass[rows_.unsqueeze(1), children.clamp(min=0)].clamp(min=1e-30).log()
            return value.masked_fill(children < 0, float("-inf"))

        result = constrained_beam_search(teacher, len(target), trie, widths[0], mask)
        items, _ = items_from_beams(result, trie, 10, mask)
        hits["teacher_beam_hr@10"] += (items == target.unsqueeze(1)).any(1).sum().item()
        sid = model.sid_codes[target]
        decoder_logits = model.sid_logits(encoded, sid)
        node = torch.zeros(len(target), dtype=torch.long)
        every = torch.arange(len(target))
        for level in range(depth):
            width = decoder_logits[level].shape[1]
            scores = {
                "decoder": decoder_logits[level].log_softmax(-1),
                "teacher": teacher(every, sid[:, :level])[:, :width],
            }
            scores["teacher"] = scores["teacher"] - scores["teacher"].logsumexp(-1, keepdim=True)
            for who, logp in scores.items():
                nll[who][level] -= logp.gather(1, sid[:, level : level + 1]).sum().item()
                correct[who][level] += (logp.argmax(1) == sid[:, level]).sum().item()
                if level == 0:
                    level1[who] += (logp.topk(5).indices == sid[:, :1]).any(1).sum().item()
            node = trie.child[node, sid[:, level]]
    n = len(rows)
    return {
        "rows": n,
        **{k: round(v / n, 4) for k, v in hits.items()},
        **{f"level1_in_top5_{who}": round(v / n, 4) for who, v in level1.items()},
        **{f"level_nll_{who}": [round(v / n, 3) for v in nll[who]] for who in nll},
        **{f"level_accuracy_{who}": [round(v / n, 3) for v in correct[who]] for who in correct},
    }


def _run_config(checkpoint: str) -> str:
    for parent in Path(checkpoint).resolve().parents:
        for name in (".hydra/config.yaml", "config.yaml"):
            if (parent / name).exists():
                return str(parent / name)
    raise SystemExit(f"no Hydra config.yaml above {checkpoint}")


if __name__ == "__main__":
    main()
