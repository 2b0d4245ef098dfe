"""The teacher client stack: requests, routing over endpoints, retries, limits, transports."""
