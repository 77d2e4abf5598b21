"""The README and docs/ point at files that exist: every linked document, and every
job, benchmark, script, config and test they name."""

import re
import subprocess

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


#: the development notes beside a developer's checkout, which a clone does not have
#: (spelled in pieces so that this file does not cite them itself)
OUTSIDE = ["..".join(["", "/shared"]), "DESIGN" + ".md", "RUNTIME" + ".md", "OFFLINE" + ".md", "STYLE" + ".md"]


def test_the_readme_stays_a_reference():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 360
    assert "bash scripts/quickstart.sh" in text and "bash scripts/test.sh" in text


def test_no_file_of_the_repository_cites_files_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    citing = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".sh", ".yaml", ".toml", ".txt", ".cfg"} or name == ".ci/run":
            text = path.read_text(errors="replace")
            citing += [f"{name}: {needle}" for needle in OUTSIDE if needle in text]
    assert tracked and not citing, citing
