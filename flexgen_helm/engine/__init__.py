"""The offloading OPT runtime. Knows nothing of HELM, suites or reports."""
