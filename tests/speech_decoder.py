"""A GLM-4-Voice decoder folder that knows all 16,384 codes, for the release fixtures.

The parity fixture (`tests/fixtures/glm4voice_decoder`, written by the original code)
has a 300-code vocabulary to stay small; a release speaks GLM-4-Voice's 16,384 codes.
`wide_decoder()` copies the fixture and widens its code embedding with seeded random
rows (the other weights and options are the fixture's), so a fixture release's spoken
answers go through the real decoder path. Built once per machine in the temp folder
(atomically: test processes may race) and reused.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from tests.conftest import FIXTURES

CODES = 16_384
SOURCE = FIXTURES / "glm4voice_decoder"


def wide_decoder(codes: int = CODES) -> Path:
    """The folder (made on first use): the fixture decoder with a `codes`-row embedding."""
    stamp = int(os.path.getmtime(SOURCE / "flow.pt"))
    dest = Path(tempfile.gettempdir()) / f"omni-wide-glm4voice-decoder-{codes}-{stamp}"
    if (dest / "flow.pt").exists():
        return dest
    work = Path(tempfile.mkdtemp(prefix="wide-decoder-"))
    shutil.copy(SOURCE / "hift.pt", work / "hift.pt")
    config = (SOURCE / "config.yaml").read_text()
    assert "vocab_size: 300" in config
    (work / "config.yaml").write_text(config.replace("vocab_size: 300", f"vocab_size: {codes}", 1))
    state = torch.load(SOURCE / "flow.pt", weights_only=True)
    table = state["input_embedding.weight"]
    extra = torch.randn((codes - table.shape[0], table.shape[1]), generator=torch.Generator().manual_seed(0))
    state["input_embedding.weight"] = torch.cat([table, extra * table.std()])
    torch.save(state, work / "flow.pt")
    try:
        work.rename(dest)  # atomic: another process may have won the race
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
    return dest
