"""The proxy's own HTTP endpoints: ``/scer/*`` and ``/metrics``."""
