"""Names both sides of the PREP protocols agree on (prep-cut-v1, health-v1).

Constants only: the difusor's agent and the institute's tools import them from
here, so neither side needs the other's code to speak to it.
"""

from __future__ import annotations

NAMESPACE_CUT = "prep-cut"
"""SSHSIG namespace of ``prep-manifest.json.sig`` (prep-cut-v1 §3)."""
NAMESPACE_PACKAGE = "prep-package"
"""SSHSIG namespace of ``<package URL>.sig``: the institute's signature over the bytes
of a PREP package zip published over HTTPS (the ``https-package`` source). Apart from
``prep-cut`` so that neither signature can stand for the other."""
NAMESPACE_HEALTH = "prep-health"
"""SSHSIG namespace of the pushed health document (health-v1 §3)."""
HEALTH_TYPE = "application/health+json"
"""Media type of the health document (health-v1 §1)."""
SIGNATURE_HEADER = "PREP-Signature"
"""HTTP header carrying the base64 SSHSIG blob of a pushed health report (health-v1 §3)."""
