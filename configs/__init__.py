"""Bundled configs: `longtune train NAME` finds NAME.yaml here."""
