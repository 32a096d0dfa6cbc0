"""Token rows for the speed benchmark, from the real data: `python benchmarks/rows.py`.

The benchmark's model shapes have random weights and no tokenizer on the GPU machine, but their
sequence lengths (and so the padding, packing and attention work) must be the real ones. This
builds every Korean dev dialogue's prompt + summary exactly as training does (the project's prompt
builder and encoder, zero-shot, Gemma 3's tokenizer, train.max_length 1024) and stores the token ids
(gzip JSON, ~0.4 MB). bench.py maps the ids into each shape's vocabulary, so the completions keep
real token statistics and the loss has something to learn.

Data: DialogSum-ko dev (CC BY-NC-SA 4.0, see data/README.md); the file holds token ids of it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dialogsum-ko" / "dev.csv"
OUT = ROOT / "benchmarks" / "data" / "dialogsum_ko_dev_rows.json.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="a DialogSum-ko CSV (default: dev)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--max-length", type=int, default=1024)
    args = ap.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"error: {args.data} not found (the shared dev set; or pass --data)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hydra import compose, initialize_config_dir

    from summarizer import data, model, pipeline, prompt
    from summarizer.config import register_configs

    register_configs()
    overrides = [
        "experiment=cpu_demo",
        f"data.path={args.data}",
        "data.val_size=0",
        f"train.max_length={args.max_length}",
        "output_dir=/tmp/bench-rows",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    examples = data.load(cfg.data)
    tokenizer = model.build_model(cfg.model, cfg.quant, cfg.cache_dir)[1]
    fmt = prompt.resolve_format(cfg.prompt.format, tokenizer)
    stop_id = model.stop_token_id(cfg.model, tokenizer)
    shots = prompt.ShotSelector(cfg.prompt.fewshot, examples)
    encode = pipeline.make_encoder(cfg, tokenizer, fmt, stop_id, shots)
    rows = []
    for ex in examples:
        r = encode(ex, True)
        n_prompt = sum(1 for label in r["labels"] if label == prompt.IGNORE_INDEX)
        rows.append(
            {
                "id": ex.id,
                "prompt": r["input_ids"][:n_prompt],
                "completion": r["input_ids"][n_prompt:],
            }
        )
    meta = {
        "source": str(args.data),
        "tokenizer": cfg.model.name,
        "max_length": args.max_length,
        "vocab_size": len(tokenizer),
        "rows": len(rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, separators=(",", ":"))
    lengths = sorted(len(r["prompt"]) + len(r["completion"]) for r in rows)
    print(
        f"{len(rows)} rows -> {args.out}; tokens min/median/max "
        f"{lengths[0]}/{lengths[len(lengths) // 2]}/{lengths[-1]}"
    )


if __name__ == "__main__":
    main()
