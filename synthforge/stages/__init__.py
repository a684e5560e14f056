"""The pipeline stages: generate -> judge -> dedup -> tag -> split (and ingest for outside data)."""
