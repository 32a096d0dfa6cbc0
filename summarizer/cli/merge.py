"""Merge a trained LoRA adapter into its base model and save a standalone model folder.

    python -m summarizer.cli.merge outputs/<day>/<run>/adapter merged/my-model [--dtype bfloat16]

The base model is the one the run trained on (read from the run's config.yaml beside the adapter),
loaded unquantized: merging into 4-bit weights would round the LoRA update away. Merged models
generate several times faster than base + adapter (no LoRA matmuls, one weight per layer).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from summarizer import compat
from summarizer.config import Config, QuantConfig
from summarizer.errors import UserError


def merge(
    adapter: Path, output: Path, dtype: str = "bfloat16", run_config: Path | None = None
) -> Path:
    from summarizer.model import build_model, load_adapter

    run_config = run_config or adapter.parent / "config.yaml"
    if not run_config.is_file():
        raise UserError(f"{run_config}: run config not found (pass --config <run>/config.yaml)")
    if output.exists():
        raise UserError(f"{output} already exists; choose a new folder (nothing is overwritten)")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(run_config))
    cfg.model.dtype = dtype
    base, tokenizer = build_model(cfg.model, QuantConfig(), cfg.cache_dir)
    merged = load_adapter(base, str(adapter)).merge_and_unload()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}-"))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, output)  # a half-written model never appears under the final name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m summarizer.cli.merge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("adapter", type=Path, help="a run's adapter folder")
    parser.add_argument("output", type=Path, help="new folder for the merged model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--config", type=Path, default=None, help="the run's config.yaml")
    args = parser.parse_args(argv)
    try:
        compat.check_versions()
        path = merge(args.adapter, args.output, args.dtype, args.config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
