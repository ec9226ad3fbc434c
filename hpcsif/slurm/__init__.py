"""Slurm integration: hostlists, a client for job queries and updates, prolog/epilog and SPANK support."""
