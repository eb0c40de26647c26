"""The dataset registry: a SQLite catalog plus one Parquet file per immutable dataset version."""

from align.registry.registry import (
    Artifact,
    DatasetVersion,
    Lineage,
    Registry,
    Run,
    check_name,
    parse_ref,
    workspace_path,
)

__all__ = ["Artifact", "DatasetVersion", "Lineage", "Registry", "Run", "check_name", "parse_ref", "workspace_path"]
