"""The Grafana dashboard and Prometheus rules of an elastic job, as code; ``build.py`` writes the files."""
