"""Configuration: Hydra recipes (`recipe=NAME key=value`) and the dataclass configs of export and publish, with
every value checked before any heavy work, and the run directory's rules (one run per directory, files written
whole or not at all)."""
