"""``python -m indexcache_train.data.preprocess`` as a user runs it, in a subprocess."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

from megatron.core.datasets.indexed_dataset import IndexedDataset

from indexcache_train.data.config import BUNDLED_TOKENIZER
from indexcache_train.data.tokenizer import load_tokenizer


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "indexcache_train.data.preprocess", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_preprocess_cli(tmp_path, subprocess_env):
    texts = [
        f"Paragraph {i}. " + "The quick brown fox jumps over the lazy dog. " * i for i in range(300)
    ]
    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "content": t}) + "\n")
    common = ["--tokenizer", str(BUNDLED_TOKENIZER), "--json-key", "content", "--workers", "2"]

    ok = _run(
        [
            "--input",
            str(tmp_path / "in.jsonl.gz"),
            "--output-prefix",
            str(tmp_path / "out/docs"),
            "--append-eod",
            *common,
        ],
        subprocess_env,
    )
    assert ok.returncode == 0, ok.stderr
    assert "docs/s" in ok.stderr and "tokens/s" in ok.stderr and "300 docs" in ok.stderr
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    ds = IndexedDataset(str(tmp_path / "out/docs"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[*tok.tokenize(t), tok.eod] for t in texts]

    # A missing key fails with the line named, exit code 1, and no output files.
    bad = _run(
        [
            "--input",
            str(tmp_path / "in.jsonl.gz"),
            "--output-prefix",
            str(tmp_path / "bad/docs"),
            "--tokenizer",
            str(BUNDLED_TOKENIZER),
            "--json-key",
            "text",
        ],
        subprocess_env,
    )
    assert bad.returncode == 1
    assert "in.jsonl.gz:1: no key 'text'" in bad.stderr and "--json-key" in bad.stderr
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
