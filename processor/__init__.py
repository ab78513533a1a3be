"""The order processor: consumes OrderCreated events and sets each order's outcome over gRPC."""
