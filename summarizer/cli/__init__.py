"""Command-line tools beside the main job: predict, merge, baselines."""
