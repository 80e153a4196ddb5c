"""The corpus of the language-model story: the bytes of a folder of text (by default the
running interpreter's standard library), split into train / validation / test by a hash of
each file's relative path, and the windows training and evaluation read from it."""
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

SPLITS = ("train", "val", "test")
# Tenths of the files (by path hash) that go to each split.
SPLIT_TENTHS = {"train": 8, "val": 1, "test": 1}
# Standard-library folders that are not the library's own source: its test suites, the IDLE
# editor, and installed third-party packages.
STDLIB_EXCLUDED = ("test", "tests", "idlelib", "site-packages")
VOCAB = 256  # bytes are the tokens
DATA_SOURCES = ("stdlib", "text")


@dataclass
class Corpus:
    """The bytes of each split, and what identifies the corpus in the results."""
    splits: Dict[str, torch.Tensor]  # split -> uint8 tokens, its files concatenated
    files: Dict[str, List[str]]  # split -> relative paths, sorted
    sha256: str  # over every file's relative path and bytes, in path order
    skipped: List[str]  # files of a text folder that are not UTF-8 text (named, not hidden)

    def describe(self) -> dict:
        return {"sha256": self.sha256, "files": {s: len(f) for s, f in self.files.items()},
                "bytes": {s: int(t.numel()) for s, t in self.splits.items()},
                "skipped_not_utf8": self.skipped}


def split_of(relative_path: str) -> str:
    """The split a file belongs to: a hash of its relative path, so the split does not
    depend on which other files exist, nor on the order they are listed in."""
    tenth = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 10
    bound = 0
    for split in SPLITS:
        bound += SPLIT_TENTHS[split]
        if tenth < bound:
            return split
    raise AssertionError("SPLIT_TENTHS must sum to 10")


def stdlib_files(root: Path) -> List[Path]:
    """The standard library's .py files under `root`, without the STDLIB_EXCLUDED packages."""
    return sorted(p for p in root.rglob("*.py")
                  if not set(p.relative_to(root).parts[:-1]) & set(STDLIB_EXCLUDED))


def load_corpus(data: str = "stdlib", root: Optional[str] = None) -> Corpus:
    """The corpus of `data` ("stdlib": this interpreter's standard library; "text": every
    UTF-8 file under `root`), split by path hash."""
    if data == "stdlib":
        base = Path(sysconfig.get_paths()["stdlib"])
        paths = stdlib_files(base)
    else:
        base = Path(root)
        if not base.is_dir():
            raise ValueError(f"--data-root {root!r} is not a folder")
        paths = sorted(p for p in base.rglob("*") if p.is_file())
    chunks: Dict[str, List[bytes]] = {s: [] for s in SPLITS}
    files: Dict[str, List[str]] = {s: [] for s in SPLITS}
    digest, skipped = hashlib.sha256(), []
    for path in paths:
        relative = path.relative_to(base).as_posix()
        content = path.read_bytes()
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(relative)
            continue
        digest.update(relative.encode() + b"\0" + content + b"\0")
        split = split_of(relative)
        chunks[split].append(content)
        files[split].append(relative)
    tokens = {s: torch.frombuffer(bytearray(b"\n".join(c)), dtype=torch.uint8) if c
              else torch.zeros(0, dtype=torch.uint8) for s, c in chunks.items()}
    return Corpus(tokens, files, digest.hexdigest(), skipped)


def check_corpus(corpus: Corpus, window: int) -> None:
    short = [s for s in SPLITS if corpus.splits[s].numel() < window + 1]
    if short:
        raise ValueError(f"the corpus' {short} split(s) hold fewer than window + 1 = "
                         f"{window + 1} bytes: give a larger folder or a smaller --window")


def training_batches(tokens: torch.Tensor, window: int, batch_size: int, steps: int, seed: int):
    """`steps` batches of `batch_size` windows at random offsets, from a generator of its own."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - window, (batch_size,), generator=generator)
        yield torch.stack([tokens[s:s + window] for s in starts.tolist()]).long()


def evaluation_windows(tokens: torch.Tensor, window: int, count: int) -> torch.Tensor:
    """`count` windows spread evenly over a split (fewer if the split is short)."""
    starts = np.unique(np.linspace(0, tokens.numel() - window, count).astype(int))
    return torch.stack([tokens[s:s + window] for s in starts]).long()
