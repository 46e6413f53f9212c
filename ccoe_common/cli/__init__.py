"""The `ccoe` command line."""
