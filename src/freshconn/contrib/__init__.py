"""Thin adapters for the frameworks Django workers run under; the core never imports them."""
