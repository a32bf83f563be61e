"""Multi-stage resumable jobs built from methods: quickstart, reinforcement generation, backfill, teacher build."""
