"""Every relative link in the project's Markdown files leads to a file or folder of the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def _markdown_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return [ROOT / p for p in out.stdout.splitlines()]
    return [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts]  # not a git checkout


def broken_links(files: list[Path], root: Path) -> list[str]:
    """`file:line: target` for each link whose target is not there, relative to the file's folder."""
    bad = []
    for md in files:
        for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                    continue
                if not (md.parent / target).exists():
                    bad.append(f"{md.relative_to(root)}:{n}: {target}")
    return bad


def test_every_relative_markdown_link_resolves():
    files = _markdown_files()
    assert any(p.name == "README.md" for p in files)
    assert broken_links(files, ROOT) == []


def test_a_link_relative_to_the_wrong_folder_is_reported(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("see [b](b.md), [c](docs/b.md#part), [web](https://x.org/y)\n")
    (docs / "b.md").write_text("")
    assert broken_links([docs / "a.md"], tmp_path) == ["docs/a.md:1: docs/b.md"]
