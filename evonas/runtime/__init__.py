"""Where work runs and is recorded: Ray backends and the MLflow tracker, shared by search and full training."""
