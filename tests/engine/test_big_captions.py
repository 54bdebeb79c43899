"""A huge caption file is read only as far as a caption can reach, and the doctor says what happens to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from studio.engine.dataset import scan_dataset

MAX_CAPTION_CHARS = 4096  # studio.engine.captions.MAX_CAPTION_CHARS (a test below checks they agree)

BIG_MB = 4  # before the cap: ~1.3 GB and ~45 s to tokenize; the issue's 50 MB file took 13.9 GB


def big_caption_dataset(root: Path, megabytes: int = BIG_MB) -> Path:
    root.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "big.png")
    Image.new("RGB", (64, 64), (30, 200, 30)).save(root / "small.png")
    (root / "small.txt").write_text("a green square", encoding="utf-8")
    words = "a red square, ohne Ähnlichkeit, 赤い四角, "  # multi-byte characters: a cut must not split one
    with open(root / "big.txt", "w", encoding="utf-8") as fh:
        for _ in range(megabytes * 1024 * 1024 // len(words.encode())):
            fh.write(words)
    return root


# Scans the folder and tokenizes its captions the way caching text embeddings does; prints peak memory and time.
MEASURE = """
import json, resource, sys, time
from studio.engine.dataset import scan_dataset
from studio.engine.families.sd import tokenize
from studio.engine.tokenizers import load_tokenizer
tok = load_tokenizer("clip-l")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
report = scan_dataset(sys.argv[1], workers=1)
ids = tokenize(tok, [item.caption for item in report.items])
print(json.dumps({"seconds": time.perf_counter() - started, "peak_growth_mb": (resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss - base) / 1024, "ids": list(ids.shape)}))
"""


def test_a_huge_caption_costs_bounded_memory_and_time_and_the_doctor_says_what_happens(tmp_path):
    folder = big_caption_dataset(tmp_path / "data")
    report = scan_dataset(folder)
    big = next(item for item in report.items if item.image_path.name == "big.png")
    assert len(big.caption) <= MAX_CAPTION_CHARS and big.caption.startswith("a red square, ohne Ähnlichkeit, 赤い四角")
    assert big.caption_truncated and big.caption_source == "file"
    issue = next(i for i in report.issues if i.file == "big.png")
    assert issue.severity == "warning"
    size_mb = (folder / "big.txt").stat().st_size / 1e6
    assert f"Caption file 'big.txt' is {size_mb:.1f} MB" in issue.problem and "caption truncated to its first" in issue.problem
    assert "the file itself is not changed" in issue.action
    assert (folder / "big.txt").stat().st_size >= BIG_MB * 1024 * 1024 - 100, "never rewritten"

    proc = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{BIG_MB} MB caption: scan + tokenize {measured['seconds']:.2f} s, peak memory +{measured['peak_growth_mb']:.0f} MB")
    assert measured["ids"] == [2, 77]
    assert measured["seconds"] < 10 and measured["peak_growth_mb"] < 150


@pytest.mark.parametrize("encoding, bom", [("utf-8", b""), ("utf-16-le", b"\xff\xfe")])
def test_cutting_a_long_file_never_splits_a_character_or_guesses_a_code_page(tmp_path, encoding, bom):
    from studio.engine import captions
    from studio.engine.captions import read_caption_file

    assert captions.MAX_CAPTION_CHARS == MAX_CAPTION_CHARS
    path = tmp_path / "c.txt"
    path.write_bytes(bom + ("ä" * 3 + "赤" * 20_000).encode(encoding))
    text = read_caption_file(path)
    assert text.encoding == ("utf-16" if bom else "utf-8") and not text.fallback
    assert text.truncated and text.text.startswith("äää赤") and set(text.text) <= {"ä", "赤"}
    assert len(text.text) <= MAX_CAPTION_CHARS
