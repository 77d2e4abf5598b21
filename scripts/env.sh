# Environment for every command of this project (sourced by the scripts; see "Installing: notes"
# in README.md). Safe to source twice.
export RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # every Ray listener on 127.0.0.1 when local
# Never RAY_AUTH_MODE=disabled here: a `ray start --head` in this shell would run with no
# authentication. The jobs turn it off only for the Ray they start themselves on
# 127.0.0.1 (pipelines/ray_setup.py); a cluster you start keeps token authentication.
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2
export RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # on GPU machines, unset it or set DS_ACCELERATOR=cuda
export DS_BUILD_OPS=0                        # DeepSpeed compiles its ops on first use, never at install
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
