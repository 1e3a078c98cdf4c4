"""``python -m nestrec.checkpoint CKPT_DIR OUT.pt``: a NestPipe sharded checkpoint as one plain file.

The output is Lightning's checkpoint dict (dense ``state_dict``, hyper-parameters, loops...) plus
``sharded_tables``: per collection, every table whole (weights, optimizer state, step). Loadable
with ``torch.load`` anywhere, no world size or nestrec strategy needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nestrec.checkpoint.sharded import CheckpointError, consolidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nestrec.checkpoint", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a sharded checkpoint directory (…/name.ckpt/)")
    parser.add_argument("out", type=Path, help="the single file to write")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; remove it or choose another path", file=sys.stderr)
        return 2
    try:
        plain = consolidate(args.checkpoint)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    partial = args.out.with_name(args.out.name + ".partial")
    torch.save(plain, partial)
    partial.replace(args.out)  # never a half-written output
    tables = [
        f"{name}[{t['weight'].shape[0]}x{t['weight'].shape[1]}]"
        for c in plain["sharded_tables"]
        for name, t in c.items()
    ]
    print(f"[nestrec] wrote {args.out}: tables {', '.join(tables)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
