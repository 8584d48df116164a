"""Dagster layer: thin assets, checks, resources, schedules and sensors over the domain library."""
