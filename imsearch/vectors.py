"""The width of an embedding: what the model produces (ResNet-50's pooled features) and what the images.embedding
column stores (halfvec(2048)). Kept apart from imsearch.model so the database side can name it without importing
the model and its runtimes."""

DIMENSIONS = 2048
