"""The repository's own text points only at what the repository holds: no issue numbers
(the tracker they would name is not in it; the reason is written out instead), and every
bench/ script that code, tests or documents name exists."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".h", ".c", ".cc", ".cpp", ".cu", ".toml", ".cfg", ".ini",
                 ".txt", ".yml", ".yaml", ".sh"}
NOT_OURS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache"}
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+|(?<![\w&#/])#\d+\b", re.IGNORECASE)
BENCH_SCRIPT = re.compile(r"\bbench/[\w/]+\.py\b")


def text_files():
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders
                         if d not in NOT_OURS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder, name)
            if path.suffix in TEXT_SUFFIXES or name == "Makefile":
                yield path


def lines_matching(pattern):
    for path in text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in pattern.finditer(line):
                yield f"{path.relative_to(ROOT)}:{number}", match.group()


def test_the_scan_reads_the_code_tests_and_documents():
    names = {str(path.relative_to(ROOT)) for path in text_files()}
    assert {"README.md", "ffr_fast/testing.py", "tests/conftest.py"} <= names


def test_no_issue_numbers():
    assert list(lines_matching(ISSUE_NUMBER)) == []


def test_every_named_bench_script_exists():
    missing = [(where, name) for where, name in lines_matching(BENCH_SCRIPT)
               if not (ROOT / name).is_file()]
    assert missing == []
