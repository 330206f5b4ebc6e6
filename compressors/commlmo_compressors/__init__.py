"""commlmo_compressors."""
