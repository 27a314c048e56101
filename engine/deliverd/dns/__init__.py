"""DNS for delivery: dnspython with a TTL cache, every failure turned into one of a few results."""
