"""The ``moe-atlas`` command line (``moe_atlas.cli``); the framework itself lives in storage/, capture/, analyses/, tasks/."""
