"""Subcommands of ``kvbm``: one module per subcommand (see kvbm/cli.py for the contract)."""
