"""LightningModules, one per task, on a shared base (backbone, weights, optimisation)."""
