"""Governance: principals and tokens, rights on cubes, the audit log."""
