"""The run directory: its files (layout), creating and locking it (folders), its models (models),
listing runs (listing, table), and plots."""
