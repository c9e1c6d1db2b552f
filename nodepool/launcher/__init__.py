"""The launcher: ``planner`` decides (pure), ``provider_worker`` advances launches and deletes
per provider, ``launcher`` is the daemon loop that applies the decisions."""
