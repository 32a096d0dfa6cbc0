"""summarizer: QLoRA fine-tuning and hyperparameter search for dialogue summarisation."""

__version__ = "0.1.0"
