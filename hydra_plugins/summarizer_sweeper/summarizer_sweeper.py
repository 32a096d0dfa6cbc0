from hydra.core.config_store import ConfigStore

from summarizer.sweep.sweeper import SummarizerSweeper, SummarizerSweeperConf


class SummarizerOptunaSweeper(SummarizerSweeper):
    """Asynchronous Optuna sweeper with pruning, resume and parallel trials (see summarizer.sweep.sweeper)."""


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="summarizer",
    node=SummarizerSweeperConf(
        _target_="hydra_plugins.summarizer_sweeper.summarizer_sweeper.SummarizerOptunaSweeper"
    ),
    provider="summarizer",
)
