"""The documentation: the MkDocs site builds with --strict (a broken link or anchor fails), every page is in its
navigation, the experiment-file reference is the one the schema generates, and the README stays a short landing
page that starts with the two set-up commands."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from slam_ray.config import Experiment
from slam_ray.config import reference as config_reference

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_site_builds_with_strict_checks(tmp_path: Path):
    # The venv's own python, as `make docs` runs it; ~2 s. NO_MKDOCS_2_WARNING only quiets Material's banner.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    pages = {p.relative_to(tmp_path / "site") for p in (tmp_path / "site").rglob("index.html")}
    assert Path("reference/config/index.html") in pages and Path("index.html") in pages
    # the home page is the README itself (docs/hooks.py), so the two cannot drift apart
    home = (tmp_path / "site" / "index.html").read_text()
    for heading in re.findall(r"^## (.+)$", (ROOT / "README.md").read_text(), re.M):
        assert heading.replace("&", "&amp;") in home, f"README section {heading!r} missing from the site's home page"


def test_the_checked_in_config_reference_is_the_generated_one():
    page = DOCS / "reference" / "config.md"
    assert page.exists(), "docs/reference/config.md is missing: run `python -m slam_ray.config.reference`"
    assert page.read_text() == config_reference.render(), (
        "docs/reference/config.md is stale (the schema in slam_ray/config/schema.py changed): "
        "run `python -m slam_ray.config.reference`")


def test_the_reference_documents_every_field_of_every_section():
    text = config_reference.render()
    sections = dict((model, title) for title, model in config_reference._sections())
    for model, title in sections.items():
        body = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
        for name, info in model.model_fields.items():
            assert f"| `{name}` |" in body, f"{title}: field {name} missing"
            words = " ".join((info.description or "").split())
            assert config_reference._escape(words) in body, f"{title}.{name}: description missing"
    # Readable: no table cell holds a long description (those get a paragraph of their own).
    for line in text.splitlines():
        if line.startswith("| `"):
            assert len(line.rsplit(" | ", 1)[-1]) <= config_reference.MAX_CELL + 2, line
    assert Experiment in sections


def test_check_mode_exits_1_on_a_stale_page_and_0_on_a_fresh_one(tmp_path: Path, capsys):
    page = tmp_path / "config.md"
    page.write_text(config_reference.render().replace("| `n_units` |", "| `n_clusters` |"))
    assert config_reference.main(["--check", "--out", str(page)]) == 1
    assert "python -m slam_ray.config.reference" in capsys.readouterr().err
    assert config_reference.main(["--out", str(page)]) == 0
    assert config_reference.main(["--check", "--out", str(page)]) == 0


def nav_pages(nav: list) -> list[str]:
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found += nav_pages(value) if isinstance(value, list) else [value]
    return found


def test_every_docs_page_is_in_the_navigation():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(listed)) == sorted(listed), "a page is listed twice in mkdocs.yml's nav"
    orphans = [p for p in pages if p not in listed]
    assert not orphans, f"pages missing from mkdocs.yml's nav: {orphans}"
    assert not [p for p in listed if p not in pages], "nav lists a page docs/ lacks"


def test_the_readme_is_short_and_starts_with_the_two_set_up_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, "README.md over 250 lines: move the detail into a docs/ page"
    first_block = re.search(r"```[a-z]*\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines() if line.split("#", 1)[0].strip()]
    assert commands == ["make demo", "make test"], commands
    # The commands come before the first section, and they are real Makefile targets.
    assert readme.index("```") < readme.index("\n## ")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
