"""Ray Serve deployments (router, replica, registry): thin glue over ccoe_common.

Empty until the services issue lands; kept so the package layout is fixed from the start.
"""
