"""The durable queue: SQLite in WAL mode (one commit is the durability point) and the store that
batches concurrent writes into one group commit."""
