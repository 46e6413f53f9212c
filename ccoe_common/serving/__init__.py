"""What the Ray Serve deployments delegate to: config, gRPC conversion, routing core, replica runtime."""
