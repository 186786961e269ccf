"""scer-proxy: an OpenAI-compatible reverse proxy that meters the energy and carbon of each request."""

__version__ = "0.1.0"
