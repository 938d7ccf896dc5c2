"""shopmtl."""
