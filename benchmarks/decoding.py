"""Decoding and RL benchmark: greedy, beam search, MBR and SFT + RL on the same validation rows.

    python benchmarks/decoding.py --data ko=/path/to/dev.csv --data en=/path/to/dev.jsonl \
        --settings "lora.r=32 train.lr=1.1e-4 prompt.fewshot.k=0"
    python benchmarks/decoding.py --cpu-smoke               # tiny model: checks the script

Per language, through the real command line (`python -m summarizer`): one SFT run with the given
settings (its validation scores are the greedy row), then the same adapter on the same validation
rows (same data file and split seed) with each decoding strategy (`stages.train=false adapter=...`),
and the RL stage on that adapter (`stages.rl=true`, greedy decoding after it). Every row's
predictions are scored twice with the run's metric: mecab morphemes with `#PersonN#` split (the
competition's tokenization) and kept whole (`metric.keep_special_tokens=true`, the honest variant).
Seconds: generation per validation row (the run's generate_seconds_per_row) and the extra training
minutes of the RL stage. Each variant is also compared with greedy on the same rows: the mean
difference of the rows' final (mecab split) and its paired bootstrap 95 % interval.

Writes <out>/decoding.json and <out>/decoding.md (a section for benchmarks/RESULTS.md).
`--rescore DIR [DIR ...]` rebuilds them from earlier output folders without running anything (e.g.
the folders of several benchmark processes run side by side, one per variant group).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (overrides on the SFT adapter, RL stage)
    "greedy": None,  # the SFT run's own evaluation
    "beam4": (["generate.strategy=beam", "generate.num_beams=4"], False),
    "mbr8": (["generate.strategy=mbr", "generate.mbr.candidates=8"], False),
    "mbr16": (["generate.strategy=mbr", "generate.mbr.candidates=16"], False),
    "sft+rl": ([], True),
}
GPU_RUN = [
    "model=gemma3_270m",
    "quant=none",
    "tracking.enabled=false",
    "train.epochs=2",
    "train.batch_size=8",
    "train.grad_accum=1",
    "train.max_length=2048",
    "train.gradient_checkpointing=false",
    "train.optim=adamw_torch_fused",
    "train.eval_steps=20",
    "train.save_steps=20",
    "generate.batch_size=32",
    "generate.max_new_tokens=96",
]
CPU_RUN = [
    "model=tiny",
    "quant=none",
    "train=debug",
    "tracking.enabled=false",
    "train.max_steps=3",
    "train.eval_steps=3",
    "train.save_steps=3",
    "train.max_length=384",
    "generate.max_new_tokens=8",
    "rl.max_steps=2",
    "rl.max_new_tokens=8",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", action="append", default=[], help="LANG=PATH (ko, en); repeatable")
    ap.add_argument("--settings", default="", help="the SFT settings (e.g. a sweep's best trial)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the shipped samples")
    ap.add_argument("--out", default=None, help="default: benchmarks/out/decoding-<time>")
    ap.add_argument("--rescore", nargs="+", default=None, metavar="DIR", help="earlier outputs")
    ap.add_argument("overrides", nargs="*", help="after --: overrides for every run")
    a = ap.parse_args()
    out = Path(a.out or ROOT / "benchmarks" / "out" / time.strftime("decoding-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    if a.rescore:
        result = rescore([Path(d) for d in a.rescore])
        _write(out, result)
        print(markdown(result))
        return
    if a.cpu_smoke:
        langs = {"en": str(ROOT / "data" / "samples" / "dialogsum_en.jsonl")}
        base = CPU_RUN
    else:
        langs = dict(d.split("=", 1) for d in a.data)
        if not langs:
            ap.error("--data LANG=PATH (or --cpu-smoke)")
        base = GPU_RUN
    common = [*base, *shlex.split(a.settings), *a.overrides]
    result = {"settings": common, "rows": []}
    for lang, path in langs.items():
        data = [f"data=dialogsum_{lang}", f"data.path={path}"]
        sft = _folder(out, lang, "greedy")
        r = _run(sft, [*common, *data])
        for name in a.variants:
            if name == "greedy":
                row = _row(lang, name, sft, r, lang)
            else:
                extra, rl = VARIANTS[name]
                args = [*common, *data, "stages.train=false", f"adapter={sft / 'adapter'}", *extra]
                if rl:
                    args.append("stages.rl=true")
                folder = _folder(out, lang, name)
                row = _row(lang, name, folder, _run(folder, args), lang)
            _versus_greedy(row, _folder(out, lang, name), sft, lang)
            result["rows"].append(row)
            _write(out, result)
    print(markdown(result))


def _write(out: Path, result: dict) -> None:
    (out / "decoding.json").write_text(json.dumps(result, indent=1))
    (out / "decoding.md").write_text(markdown(result))


def _folder(out: Path, lang: str, name: str) -> Path:
    return out / (f"{lang}_sft" if name == "greedy" else f"{lang}_{name.replace('+', '_')}")


def rescore(dirs: list[Path]) -> dict:
    """The rows of earlier outputs scored again from their run folders, in the order given."""
    result = {"settings": {}, "rows": []}
    for d in dirs:
        old = json.loads((d / "decoding.json").read_text())
        for r in old["rows"]:
            lang, name = r["lang"], r["variant"]
            known = result["settings"].setdefault(lang, old["settings"])
            if known != old["settings"]:
                raise SystemExit(f"{d}: other {lang} settings than the folders before it")
            run = {"returncode": r["returncode"], "wall_s": r["wall_s"]}
            row = _row(lang, name, _folder(d, lang, name), run, lang)
            _versus_greedy(row, _folder(d, lang, name), _folder(d, lang, "greedy"), lang)
            result["rows"].append(row)
    return result


@functools.cache  # greedy's rows are compared with every other variant's
def _finals(folder: Path, language: str, keep: bool) -> tuple[tuple[str, float], ...]:
    """Each validation row's (id, final) from the folder's predictions.csv: `#PersonN#` split
    into morphemes (keep=False, the competition's) or kept whole."""
    from summarizer import metrics
    from summarizer.config import TaskConfig

    with (folder / "predictions.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    tok = metrics.resolve_tokenizer("auto", language)
    p, r = [x["prediction"] for x in rows], [x["reference"] for x in rows]
    scores = metrics.score_rows(TaskConfig(), p, r, tok, keep)
    return tuple((x["fname"], s["final"]) for x, s in zip(rows, scores))


def _versus_greedy(row: dict, folder: Path, greedy: Path, language: str) -> None:
    """row["vs_greedy"]: the mean difference of the rows' final (mecab split) against greedy on
    the same rows, with a paired bootstrap 95 % interval (what one seed's difference is worth)."""
    from summarizer.sweep.report import paired_bootstrap

    if "error" in row or row["variant"] == "greedy" or not (greedy / "predictions.csv").is_file():
        return
    mine, base = dict(_finals(folder, language, False)), dict(_finals(greedy, language, False))
    ids = [i for i in mine if i in base]
    if len(ids) != len(mine):
        row["vs_greedy"] = {"error": "not the same validation rows as greedy"}
        return
    b = paired_bootstrap([mine[i] for i in ids], [base[i] for i in ids])
    row["vs_greedy"] = {k: b[k] for k in ("mean_diff", "low", "high")}


def _run(folder: Path, overrides: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "summarizer", *overrides, f"hydra.run.dir={folder}"]
    t0 = time.time()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f"{folder.name}.log").open("w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    return {"returncode": rc, "wall_s": time.time() - t0}


def _row(lang: str, name: str, folder: Path, run: dict, language: str) -> dict:
    row = {"lang": lang, "variant": name, **run}
    result = _json(folder / "result.json")
    if run["returncode"] != 0 or not result:
        row["error"] = f"exit {run['returncode']}: see {folder.name}.log"
        return row
    row.update(result.get("metrics", {}))
    for keep, key in ((False, "final_split"), (True, "final_whole")):
        finals = [value for _, value in _finals(folder, language, keep)]
        row[key] = sum(finals) / len(finals)
    row["rows"] = len(finals)
    rl = _json(folder / "rl_metrics.json")
    if rl:
        seconds = rl.get("rl_seconds") or rl.get("train_seconds")
        row["rl_minutes"] = seconds / 60 if seconds else None
        row["rl_reward_first"] = rl.get("rl_reward_first")
        row["rl_reward_last"] = rl.get("rl_reward_last")
    train = _json(folder / "train_metrics.json")
    if train and name == "greedy":
        row["sft_minutes"] = train.get("train_seconds", 0) / 60
    return row


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    settings = result["settings"]  # one list, or (--rescore) one per language
    named = settings.items() if isinstance(settings, dict) else [("", settings)]
    lines = [f"Settings{f' ({k})' if k else ''}: `{' '.join(v)}`." for k, v in named]
    lines += [
        "",
        "| lang | variant | rows | ROUGE-1 | ROUGE-2 | ROUGE-L | final (#PersonN# whole) | "
        "final (mecab split) | vs greedy (split, 95 % CI) | generate s/row | extra training min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['lang']} | {r['variant']} | {r['error']} | | | | | | | | |")
            continue
        v = r.get("vs_greedy")
        if not v:
            versus = "-"
        elif "error" in v:
            versus = v["error"]
        else:
            versus = f"{v['mean_diff']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}]"
        lines.append(
            f"| {r['lang']} | {r['variant']} | {r.get('rows')} | {_f(r.get('rouge1'), '.2f')} | "
            f"{_f(r.get('rouge2'), '.2f')} | {_f(r.get('rougeL'), '.2f')} | "
            f"{_f(r.get('final_whole'), '.2f')} | {_f(r.get('final_split'), '.2f')} | {versus} | "
            f"{_f(r.get('generate_seconds_per_row'), '.3f')} | {_f(r.get('rl_minutes'), '.1f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
