"""Runtime: engine threads, pacing, telemetry."""
