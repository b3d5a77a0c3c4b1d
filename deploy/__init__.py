"""Dask cluster profiles and the one place a Dask client is made."""

from .cluster import client, close_client, dashboard_link  # noqa: F401
