"""Matches to tables and pages: metrics over ranked matches (metrics), the report folder (report) and its
pictures (pictures)."""
