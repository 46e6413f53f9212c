"""Who may call what: bearer tokens, roles (inference, admin, replica) and tenants."""
