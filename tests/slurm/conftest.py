"""Fixtures for the Slurm tests: the hpcsif-configured cluster lives in cluster_setup.py."""

from tests.services.registry import registry_open  # noqa: F401  (a session fixture)
from tests.services.sshd import sshd_server  # noqa: F401  (a session fixture)
from tests.services.users import unpriv_user  # noqa: F401  (a session fixture)
from tests.slurm.cluster_setup import hpcsif_cluster  # noqa: F401  (a session fixture)
