"""pulsar-rest: run pulsar (Capistrano) deployment tasks over HTTP."""

__version__ = "0.1.0"
