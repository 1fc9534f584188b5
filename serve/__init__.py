"""Ray Serve wiring of the stages (see issue 3)."""
