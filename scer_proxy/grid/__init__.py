"""Live grid carbon-intensity feeds (I/O), with fallback to the bundled table in :mod:`scer_proxy.carbon.grid`."""
