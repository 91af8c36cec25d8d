"""Plan and launch distributed training: Hydra configs -> planner -> Ray Train -> MLflow."""

__version__ = "0.1.0"
