"""Training side: datasets, ultralytics runs and publishing of new model versions."""
