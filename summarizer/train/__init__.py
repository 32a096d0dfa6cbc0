"""Training: the loss, the trainer, checkpoints and resume, callbacks, and `fit`."""
