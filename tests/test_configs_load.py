"""Every shipped YAML loads into its job's config; the base stages encode the published recipe."""

import pytest

from jobs.build_sdvi import BuildSDVIJob
from jobs.build_world import BuildWorldJob
from jobs.demo import DemoConfig
from jobs.evaluate import EvaluateJob
from jobs.tokenize_manifest import TokenizeJob
from omni_model.config import load_config
from pipelines.tokenizers.config import TokenizersConfig
from pipelines.train import StageConfig
from pipelines.train.release_config import ReleaseFinetuneConfig
from serve.config import ServeConfig
from tests.conftest import ROOT

JOBS = {"demo": DemoConfig, "world": BuildWorldJob, "sdvi": BuildSDVIJob, "sdvi_eval": BuildSDVIJob,
        "tokenize": TokenizeJob, "tokenize_sdvi": TokenizeJob, "tokenizers": TokenizersConfig,
        "tokenizers_train": TokenizersConfig, "stage1": StageConfig, "stage2": StageConfig, "stage3": StageConfig,
        "evaluate": EvaluateJob, "serve": ServeConfig}
#: a folder whose files are named after other jobs than the top-level ones
FOLDER_JOBS = {"release": {"stage3": ReleaseFinetuneConfig, "stage3_tiny": ReleaseFinetuneConfig}}
SERVE_APPS = {"serve_app"}  # Ray Serve's own config-file format


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_config_files_load(path):
    if path.stem in SERVE_APPS:
        import yaml
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        for application in schema.applications:
            assert application.import_path == "serve.app:build_app"
            args = dict(application.args)
            load_config(ServeConfig, ROOT / args.pop("config"), [f"{k}={v}" for k, v in args.items()])
        return
    load_config({**JOBS, **FOLDER_JOBS.get(path.parent.name, {})}[path.stem], path)


def test_base_stages_reproduce_the_published_recipe():
    lrs = []
    for n in (1, 2, 3):
        cfg = load_config(StageConfig, ROOT / f"configs/base/stage{n}.yaml")
        assert cfg.stage == n and cfg.scaling.num_workers == 8 and cfg.scaling.use_gpu
        assert cfg.scaling.backend == "deepspeed" and cfg.scaling.zero_stage == 2 and cfg.scaling.bf16
        assert cfg.data.max_seq_len == 3072 and cfg.data.max_pads == 16 and cfg.data.pad_ratio == 0.6
        assert cfg.data.rows_per_step * cfg.optim.grad_accum * cfg.scaling.num_workers == 128
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.warmup_ratio == 0.03
        assert cfg.model.shift_logits or n > 1
        lrs.append(cfg.optim.lr)
    assert lrs == [1e-4, 1e-4, 1e-5]
