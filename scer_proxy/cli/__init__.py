"""The command line: one module a command, the only place with process-wide side effects."""
