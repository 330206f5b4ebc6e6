"""commlmo_lmos."""
