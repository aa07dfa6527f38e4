"""Config schema, model and data loading, the training loop, checkpoints and metrics."""
