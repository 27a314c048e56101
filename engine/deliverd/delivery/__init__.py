"""Deciding and performing delivery: the pure router (planner), the attempt loop, retry backoff,
credential choice, the scheduler, and the smart host probe."""
