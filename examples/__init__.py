"""Runnable example applications built on dotmac_core."""
