"""Ray Serve application hosting the routed model."""
