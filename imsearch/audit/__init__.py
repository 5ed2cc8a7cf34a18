"""Audit a library: label suspects, leaks between classes, duplicate groups and outliers (`imsearch audit`)."""
