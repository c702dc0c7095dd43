"""The Kubernetes operator for ElasticJob (``elastic.dev/v1alpha1``), in parts:

* ``contract``: the driver <-> operator contract (status.trainer, status.targetWorkers); no kopf,
  the only part a driver imports;
* ``spec``: the ElasticJob spec validated (with elastic.config's job-spec models) and the operator's settings;
* ``builders``: pure builders of the RayCluster, the driver RayJob, the ConfigMap, the volume and the NetworkPolicy;
* ``client``: API plumbing (create / read / delete of children by kind);
* ``reconcile``: one scaling pass and the status it leads to;
* ``handlers``: the kopf handlers (``controller.k8s_operator`` registers them for ``kopf run``).

This package's ``__init__`` imports nothing, so importing the contract does not load kopf.
"""
