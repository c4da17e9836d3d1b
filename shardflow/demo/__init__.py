"""Self-checking demos run by ``shardflow demo``: each is a worker function started on every rank."""
