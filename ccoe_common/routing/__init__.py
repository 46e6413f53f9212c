"""Routing: which expert(s) answer a request, and why (rule table, explicit choice, default)."""
