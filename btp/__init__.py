"""MESGD runner: sequential model editing with MELO and baselines."""
