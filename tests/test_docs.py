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


def test_the_readme_layout_names_every_module_and_folder():
    """README's "Layout" is checked against the tree: every top-level folder, every module
    of the packages' top levels and of omni_model/tokenizers/, every subpackage, is named
    there (a `train_*.py` pattern counts for the files it matches)."""
    text = (ROOT / "README.md").read_text()
    layout = text.split("## Layout", 1)[1].split("```")[1]
    words = set(re.findall(r"[\w]+", layout))
    patterns = [p.replace("*", r"\w*") for p in re.findall(r"\b(\w+\*)", layout)]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    wanted = {name.split("/")[0] for name in tracked if "/" in name and not name.startswith(".")}
    for name in tracked:
        parts = name.split("/")
        if parts[0] not in ("omni_model", "pipelines", "serve", "jobs") or not name.endswith(".py"):
            continue
        flat = len(parts) == 2 or parts[:2] == ["omni_model", "tokenizers"] and len(parts) == 3
        if flat and not parts[-1].startswith("__"):
            wanted.add(parts[-1][:-3])
        elif len(parts) > 2:
            wanted.add(parts[-2] if parts[:2] == ["omni_model", "tokenizers"] else parts[1])
    missing = sorted(w for w in wanted if w not in words and not any(re.fullmatch(p, w) for p in patterns))
    assert not missing, f"README's Layout does not name: {missing}"


def _chain_commands(profile_dir: str) -> list[list[str]]:
    """The commands scripts/pipeline.sh runs (its `step` lines), for one configs/ folder."""
    commands = []
    for line in (ROOT / "scripts/pipeline.sh").read_text().splitlines():
        if line.startswith("step ") and "jobs/" in line:
            line = re.sub(r"\$\(budget \w+\)", "", line)  # only with --minutes
            line = line.replace('"$TOKENIZERS_CONFIG"', "$CONF/tokenizers.yaml")
            line = line.replace("$PY", "python").replace("$CONF", profile_dir)
            commands.append(line.split()[2:])
    return commands


def test_running_each_job_is_the_quickstarts_chain_command_by_command():
    """README's "Running each job" lists what the quickstart runs, in its order and with its
    configs and nothing else, so that a reader who types them gets the quickstart's model.
    (CI runs the same chain at the ci profile: `bash scripts/quickstart.sh ci`.)"""
    block = (ROOT / "README.md").read_text().split("## Running each job", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    documented = [line.split("#")[0].split() for line in block.splitlines() if line.startswith("python jobs/")]
    assert documented[0][:2] == ["python", "jobs/estimate_run.py"]
    assert documented[-1][:2] == ["python", "jobs/deploy.py"]
    chain = _chain_commands("configs/tiny")
    assert len(chain) == 10
    assert documented[1:-1] == chain


def test_the_ci_profile_has_every_config_of_the_chain_and_each_loads():
    """configs/ci/ changes configs/tiny/ (`base:`): every file the chain reads exists in both,
    and each ci file resolves to its tiny base with the same sections."""
    from omni_model.config import read_config_file

    for command in _chain_commands("configs/ci"):
        path = ROOT / command[command.index("--config") + 1]
        tiny = ROOT / "configs/tiny" / path.name
        assert path.exists() and tiny.exists(), path
        assert read_config_file(path).keys() == read_config_file(tiny).keys(), path
