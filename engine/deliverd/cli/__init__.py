"""The deliverd command: one module per command group; main builds the argument parser."""
