"""Command-line tools beside the main job: predict, merge, baselines, and the torchrun launcher
that `python -m summarizer distributed=ddp` hands its ranks to (launch.py)."""
