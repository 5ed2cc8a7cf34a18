"""Embedding on a Ray cluster: the mapper of imsearch.mapper in the actors of a Ray Data pool (`imsearch ingest
--ray ADDRESS`, the `ray` extra). Only this package imports ray, and only when a cluster is asked for."""

from .runner import Layout, RayRunner, layout

__all__ = ["Layout", "RayRunner", "layout"]
