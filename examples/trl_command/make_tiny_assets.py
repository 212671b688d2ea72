"""Write the tiny local model, its tokenizer and an arithmetic dataset for ``run.yaml`` (no downloads).

Writes under ``--out`` (default ``outputs/trl_command``):

- ``model/``: the randomly initialised 2-layer Qwen2 model and word-level tokenizer of
  :mod:`grpo_plugins_trl.testing`, saved with ``save_pretrained``;
- ``train.jsonl``: "a + b =" problems with columns ``prompt``, ``answer`` (the sum) and ``prompt_id``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_assets(out: Path, rows: int = 64) -> None:
    from grpo_plugins_trl.testing import arithmetic_dataset, tiny_model, tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tiny_model().save_pretrained(out / "model")
    tiny_tokenizer().save_pretrained(out / "model")
    with open(out / "train.jsonl", "w") as handle:
        for row in arithmetic_dataset(rows):
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/trl_command"))
    parser.add_argument("--rows", type=int, default=64, help="dataset rows")
    args = parser.parse_args()
    write_assets(args.out, args.rows)
    print(f"model: {args.out / 'model'}\ndataset: {args.out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
