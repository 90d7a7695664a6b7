"""Projects: the wrapper that groups a product's releases."""
