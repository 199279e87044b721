"""Results a person can read: per_class.csv, pictures (PR curves, confusion matrix, per-class bars, gallery,
training curves) and report.html in a run's log directory; `resnet-tasks report RUN_DIR...` for finished runs."""
