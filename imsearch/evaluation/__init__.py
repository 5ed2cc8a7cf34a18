"""Matches to tables and pages: the test folder sorted into queries (queries), metrics over ranked matches
(metrics), the report folder (report) and its pictures (pictures)."""
