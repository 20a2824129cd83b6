"""reporting: read models projected from opportunity events, with an API and a dashboard."""
