"""Sockets as memory sees them: TX and RX buffers charged to the modelled machine."""
