"""The README and docs/ point at files that exist: every linked document, and every
job, benchmark, script, config and test they name."""

import re

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"\b((?:jobs|benchmarks|scripts|configs|tests|serve|pipelines|omni_model)/[\w/.-]+\.(?:py|sh|yaml))\b")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_a_document_names_exists(doc):
    text = doc.read_text()
    links = re.findall(r"\]\(([^)#]+)\)", text)
    missing = [link for link in links if not link.startswith("http") and not (doc.parent / link).exists()]
    named = [p for p in PATH.findall(text) if not re.search(r"[A-Z]", p)]  # stageN.py, X.py: placeholders
    missing += [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def test_the_readme_stays_a_reference_and_cites_nothing_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 360
    assert "../shared" not in text and "DESIGN.md" not in text and "RUNTIME.md" not in text
    assert "bash scripts/quickstart.sh" in text and "bash scripts/test.sh" in text
