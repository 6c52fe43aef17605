"""Planning a task from its own data: its fingerprint (:mod:`.fingerprint`) and the config planned from it (:mod:`.plan`)."""
