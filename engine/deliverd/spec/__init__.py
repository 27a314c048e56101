"""The delivery spec: the one schema (package data), validation with JSON pointers and hints, the
normaliser that applies every default, and the renderer that turns a spec into the engine's config
files."""
