"""The README and docs/ link only to files that exist (relative links; web links are not fetched)."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_dead_relative_links():
    dead = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for m in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", md.read_text()):
            target = m.group(1)
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (md.parent / target).exists():
                dead.append(f"{md.relative_to(REPO)}: {target}")
    assert not dead, "dead links:\n" + "\n".join(dead)
