"""Reading and writing models and their records: architecture facts, Hub fetch, lazy loading, calibration sets,
the canonical checkpoint, provenance facts and manifests. Knows no solver."""
