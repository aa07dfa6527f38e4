"""Command line and process launchers (torchrun and Ray entry points come with the launch issue)."""
