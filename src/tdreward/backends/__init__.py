"""Backends load and run models named by a spec string (see tdreward.specs)."""
