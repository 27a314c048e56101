"""How mail enters the engine: the SMTP listener."""
