"""The ``acmix`` command line. Each subcommand module exposes ``register(subparsers)``."""
