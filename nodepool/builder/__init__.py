"""The image builder: decides (``planner``), builds (``runner`` with the configured build command
or the shipped ``image_create``), uploads and deletes (``builder``, the daemon)."""
