"""The ops CLI on a Kubernetes cluster, through the official `kubernetes` client: which
kubeconfig context and namespace, where a charts/ccoe release's ops Service and pods are, a
port-forward the CLI opens and closes itself, and what `ccoe cluster status` shows.

    release.py      finding a release's objects (pure functions over API objects)
    cluster.py      kubeconfig, API calls with errors that name what is missing, forward_to_ops
    portforward.py  a local TCP port relayed to port-forward streams
    status.py       the cluster status as typed data, and its text
"""
