"""Built-in restoration backends, one package each (registered as entry points)."""
