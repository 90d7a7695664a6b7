"""API tokens: created once, shown once, stored as a hash."""
