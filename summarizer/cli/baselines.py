"""Trivial baselines on the validation split, to read ROUGE against what the metric gives for free.

    python -m summarizer.cli.baselines data.path=/path/to/dev.csv [data=dialogsum_en ...]

Same overrides, split and metric as a run: `first_turn` copies the dialogue's first line;
`fixed_summary` pastes on every row the one training summary that scores best against the other
training summaries (chosen on the training split only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from summarizer import data, metrics
from summarizer.config import register_configs
from summarizer.errors import UserError

CONF = Path(__file__).resolve().parents[2] / "conf"


def first_turn(dialogue: str) -> str:
    return dialogue.strip().split("\n", 1)[0].strip()


def fixed_summary(
    train: list[data.Example], tokenizer: str, keep: bool, candidates: int = 120
) -> str:
    """The training summary with the best mean ROUGE sum against a sample of the others."""
    pool = [ex.summary for ex in train]
    refs = pool[:: max(1, len(pool) // candidates)]
    best, best_score = pool[0], -1.0
    for cand in refs:
        others = [r for r in refs if r is not cand]
        score = metrics.rouge([cand] * len(others), others, tokenizer, keep)["rouge_sum"]
        if score > best_score:
            best, best_score = cand, score
    return best


def run(overrides: list[str]) -> dict:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "output_dir=."])
    examples = data.load(cfg.data)
    train, val = data.split(examples, cfg.data.val_size, cfg.data.split_seed)
    tok = metrics.resolve_tokenizer(cfg.metric.tokenizer, cfg.data.language)
    keep = cfg.metric.keep_special_tokens
    refs = [ex.summary for ex in val]
    fixed = fixed_summary(train, tok, keep)
    return {
        "data": cfg.data.path,
        "split": {"train": len(train), "validation": len(val), "seed": cfg.data.split_seed},
        "tokenizer": tok,
        "first_turn": metrics.rouge([first_turn(ex.dialogue) for ex in val], refs, tok, keep),
        "fixed_summary": {**metrics.rouge([fixed] * len(val), refs, tok, keep), "text": fixed},
    }


def main() -> int:
    try:
        print(json.dumps(run(sys.argv[1:]), indent=2, ensure_ascii=False))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
