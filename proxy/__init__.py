"""tlsproxy: a TLS-terminating reverse proxy with mutual TLS and a certificate toolkit."""

__version__ = "0.1.0"
