"""Engine statistics: Prometheus metrics, the periodic log line, OpenTelemetry traces."""
