"""The snapshot target: a raw partition or disk holding a checksummed superblock (two copies) and image slots."""
