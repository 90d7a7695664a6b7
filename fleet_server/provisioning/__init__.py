"""Device provisioning: one-time tokens an operator hands to a device, exchanged for its identity and broker account."""
