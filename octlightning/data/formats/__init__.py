"""Read and write of each on-disk file format."""
