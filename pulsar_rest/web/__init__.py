"""The HTTP layer: translates requests into calls on the service and results into JSON."""
