"""What an operator sees of a running engine: log lines, counters and the event loop choice."""
