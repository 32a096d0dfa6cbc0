"""Hydra discovers sweepers only inside the `hydra_plugins` namespace: this registers
`hydra/sweeper=summarizer`, whose code lives in summarizer/sweeper.py."""
