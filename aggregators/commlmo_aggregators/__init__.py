"""commlmo_aggregators."""
