"""The engine's typed, frozen configuration and the loader that reads a rendered config and its
secrets file, re-validating them with the spec's schema."""
