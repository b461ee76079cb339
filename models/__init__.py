"""Model definitions and dataset readers for the workloads raylab trains."""
