"""Entry point of the ElasticJob operator: ``kopf run --standalone --namespace=NS -m controller.k8s_operator``.

Importing this module registers the handlers of :mod:`controller.k8s.handlers` in kopf's default
registry, with the settings of the environment (:meth:`controller.k8s.spec.OperatorConfig.from_env`).
The parts live in :mod:`controller.k8s`; drivers import only :mod:`controller.k8s.contract`.
"""

from __future__ import annotations

import kopf

from controller.k8s.handlers import register
from controller.k8s.spec import OperatorConfig

register(kopf.get_default_registry(), OperatorConfig.from_env())
