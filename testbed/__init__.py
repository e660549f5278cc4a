"""netswap's shared pieces: the NBD protocol, configuration, logging, and the harness."""
