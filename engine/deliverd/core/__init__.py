"""Types every stage shares and that depend on nothing: delivery outcomes with enhanced status
codes, and the duration and size units of the spec."""
