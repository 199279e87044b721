"""Dataset formats: each module parses one format and holds the data modules that read it."""
