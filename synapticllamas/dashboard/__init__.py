"""The unified dashboard: a separate process that shows the events the shells push to Redis."""
