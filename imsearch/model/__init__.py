"""Image to vector, no database: decoding (pixels), the network (resnet), its runtimes and the model identity
(embed, runtimes, checksums)."""
