"""Ray Serve wiring of the stages: one deployment per stage, the HTTP ingress, job store and metrics."""
