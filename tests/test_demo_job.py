"""The demo job's command line, config and outputs (the full run is the quickstart)."""

import yaml

from jobs.demo import main
from omni_model.transformer import Transformer
from omni_model.vocab import Vocab
from tests.conftest import ROOT


def test_demo_job_writes_resolved_config_and_loadable_checkpoint(tmp_path, capsys):
    rc = main(["--config", str(ROOT / "configs/tiny/demo.yaml"), f"out_dir={tmp_path}",
               "fit.steps=3", "model.layers=1"])
    assert rc == 1  # three steps cannot memorise the samples, and the job says so
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["fit"]["steps"] == 3 and resolved["model"]["layers"] == 1
    model = Transformer.from_pretrained(tmp_path / "checkpoint")
    assert model.config.num_hidden_layers == 1
    assert Vocab.load(tmp_path / "checkpoint").size == model.config.vocab_size
    assert "regenerated exactly:" in capsys.readouterr().out
