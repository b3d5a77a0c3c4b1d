"""Dask cluster profiles and the one place a Dask client is made."""

from .cluster import (  # noqa: F401
    ClusterError,
    check_settings,
    client,
    close_client,
    cluster_errors,
    dashboard_link,
    explain,
    security,
)
