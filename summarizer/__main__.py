"""`python -m summarizer [overrides]`: compose conf/config.yaml and run the pipeline."""

from __future__ import annotations

import logging
import os
import sys

# Quieter third-party start-up; set before they are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from summarizer.config import register_configs
from summarizer.errors import UserError

register_configs()
log = logging.getLogger("summarizer")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from summarizer.pipeline import run

    try:
        return run(cfg)
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed and goes on
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
