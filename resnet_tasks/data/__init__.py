"""LightningDataModules, datasets and transforms for the three tasks and the bundled shapes data."""
