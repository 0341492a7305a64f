"""Getting a project out of mloop and into other systems (``mloop export ...``)."""

from mloop.export.k8s import k8s_manifests, write_k8s

__all__ = ["k8s_manifests", "write_k8s"]
