"""Reports of HELM suites: tables and plots of accuracy and timing, and paired suite comparisons.

Reads files only (run folders, timing log); `build.build_report` is the entry point, `cli` the command.
"""
