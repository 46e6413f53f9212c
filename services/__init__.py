"""Ray Serve deployments: thin glue between gRPC messages and ccoe_common.

router/  the ingress (ccoe.v1.Inference + grpc.health.v1.Health) -> ccoe_common.serving.router_core
replica/ one engine per replica -> ccoe_common.serving.replica
app.py   build_app(config): validates the config once and binds the deployments
"""
