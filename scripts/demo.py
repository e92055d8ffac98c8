"""`make demo`: train the toy on the bundled corpus, export it to HF, reload it with transformers.

1. ``train.py +experiment=demo``: a 4-layer GLM-5-shaped model with IndexCache freq 2, dense
   warm-up of the Full-layer indexers, then 60 sparse steps, long enough for the LM loss to fall
   visibly (CPU or GPU, picked automatically; ~1 minute on 2 CPU cores).
2. ``python -m checkpoint_tools export``: the final checkpoint as an HF directory (no indexer
   tensors on Shared layers, schedule keys explicit).
3. ``GlmMoeDsaForCausalLM.from_pretrained`` on that directory and a held-out forward pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "runs" / "demo"


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def _tail_mean(rows: list[dict], n: int = 10) -> float:
    tail = [r["loss/lm"] for r in rows[-n:]]
    return sum(tail) / len(tail)


def main() -> int:
    _run([sys.executable, "train.py", "+experiment=demo", f"run.root={ROOT}"])
    run_dir = ROOT / "demo-local"
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    hf_dir = ROOT / "hf"
    _run(
        [
            sys.executable,
            "-m",
            "checkpoint_tools",
            "export",
            "--ckpt",
            str(ckpt),
            "--out",
            str(hf_dir),
            "--overwrite",
        ]
    )

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers hard-codes GLM-5's MTP layer index (78) in its ignore list, so the toy's MTP
    # tensors (model.layers.4.*) are reported as unexpected; they are dropped, as intended.
    hf_logging.set_verbosity_error()

    from indexcache_train.data import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    config = json.loads((hf_dir / "config.json").read_text())
    tok = load_tokenizer(REPO / "data" / "default" / "gpt2.tiktoken")
    ids = torch.tensor(
        [
            tok.tokenize(
                "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."
            )
        ]
    )
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(
        f"\ndemo OK | trained {len(rows)} steps ({rows[0]['stage']} -> {rows[-1]['stage']}), "
        f"lm loss {rows[0]['loss/lm']:.3f} -> {_tail_mean(rows):.3f} (mean of the last 10) | "
        f"exported {hf_dir} "
        f"(indexer_types {''.join('F' if t == 'full' else 'S' for t in config['indexer_types'])}) | "
        f"transformers reload: {type(model).__name__}, sample loss {loss.item():.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
