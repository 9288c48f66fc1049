"""Data: sources of raw examples, tokenized features, batch order and collation."""
