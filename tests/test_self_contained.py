"""The repository stands alone: a user's clone has no team folder beside it, so no tracked file may read one
or name a document the repository lacks, and the fixtures the tests need are in tests/data/."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Spelled in pieces so this file does not match itself.
FORBIDDEN = ["../" + "shared", "SLAM_RAY_" + "FIXTURES", "DESIGN" + ".md", "RECIPE" + ".md"]


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [ROOT / name for name in out.split("\0") if name]


def test_no_file_reads_or_names_a_folder_or_document_outside_the_repository():
    offending = []
    for path in tracked_files():
        if not path.is_file() or path.suffix in {".flac", ".png", ".npy", ".bin", ".wav"}:
            continue
        text = path.read_text(errors="replace")
        offending += [f"{path.relative_to(ROOT)}: {word}" for word in FORBIDDEN if word in text]
    assert not offending, "\n".join(offending)


def test_every_markdown_link_to_a_repository_file_resolves():
    broken = []
    for path in tracked_files():
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, "\n".join(broken)


def test_the_fixtures_are_in_the_repository(fixtures: Path):
    assert fixtures.is_relative_to(ROOT / "tests" / "data")
    assert {p.name for p in fixtures.iterdir()} >= {"audio1.flac", "audio2.flac", "features.jsonl", "tokens.jsonl",
                                                     "README.md"}
    assert "MIT" in (fixtures / "README.md").read_text()
