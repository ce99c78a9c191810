"""CLI subcommands; see favor/cli.py for the table that names them."""
