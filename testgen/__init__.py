"""Independent test-only chest CT generator (see docs/phantoms.md): never used for training or model selection."""
