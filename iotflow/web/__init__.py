"""HTTP views served by the worker's own web server, grouped by resource."""
