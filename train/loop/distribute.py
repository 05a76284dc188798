"""tf.distribute for `fit --strategy`: which strategy, which worker this process is, what it may write.

    default      one device (TensorFlow's default strategy)
    mirrored     MirroredStrategy: one replica per local GPU (per logical CPU device if there is no GPU)
    multiworker  MultiWorkerMirroredStrategy: one or more replicas on each of several processes or
                 machines, configured by the TF_CONFIG environment variable
    auto         mirrored when more than one GPU is visible, else default

`--batch-size` is per replica; the global batch is that times the number of replicas in sync
(see docs/scaling.md for how the learning rate relates to it).

The role of this process (`ClusterRole`) is read from TF_CONFIG without importing TensorFlow,
so a bad TF_CONFIG is refused in a second, and only the chief (task "chief", or "worker" 0
when the cluster names no chief, as TensorFlow decides) writes the run directory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from common.errors import UserError

STRATEGIES = ("auto", "default", "mirrored", "multiworker")
# a collective that waits longer than this for a peer fails instead of hanging forever: a worker
# that died, or never started, stops the others with an error
COLLECTIVE_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class ClusterRole:
    """This process's place in a multi-worker cluster (a single process is its own chief)."""

    task_type: str = "chief"
    task_index: int = 0
    workers: int = 1
    cluster_has_chief: bool = True

    @property
    def is_chief(self) -> bool:
        """TensorFlow's rule: the "chief" task, or worker 0 of a cluster that names no chief."""
        return self.task_type == "chief" or (self.task_index == 0 and not self.cluster_has_chief)

    def describe(self) -> str:
        return f"{self.task_type} {self.task_index} of {self.workers} workers"


def read_cluster_role(strategy: str, environment: dict | None = None) -> ClusterRole:
    """The role TF_CONFIG gives this process under `--strategy multiworker`; a single process otherwise."""
    environment = os.environ if environment is None else environment
    if strategy != "multiworker":
        return ClusterRole()
    text = environment.get("TF_CONFIG", "")
    if not text.strip():
        raise UserError("--strategy multiworker needs TF_CONFIG: the cluster's workers and this process's task "
                        "(see docs/scaling.md)")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"TF_CONFIG is not JSON ({error.msg} at character {error.pos})") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError('TF_CONFIG needs "cluster" and "task" objects, e.g. {"cluster": {"worker": '
                        '["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}')
    roles = {name: addresses for name, addresses in cluster.items() if name in ("chief", "worker")}
    for name, addresses in roles.items():
        if not isinstance(addresses, list) or not all(isinstance(address, str) and ":" in address
                                                      for address in addresses):
            raise UserError(f'TF_CONFIG: cluster "{name}" must be a list of "host:port" addresses')
    if not roles:
        raise UserError('TF_CONFIG: the cluster names no "worker" (or "chief") addresses')
    if len(roles.get("chief", [])) > 1:
        raise UserError("TF_CONFIG: a cluster has at most one chief")
    task_type, task_index = task.get("type"), task.get("index")
    if task_type not in roles:
        raise UserError(f'TF_CONFIG: task type {task_type!r} is not one of the cluster\'s {", ".join(sorted(roles))}')
    if not isinstance(task_index, int) or isinstance(task_index, bool) \
            or not 0 <= task_index < len(roles[task_type]):
        raise UserError(f"TF_CONFIG: task index {task_index!r} is not an index of the cluster's "
                        f"{len(roles[task_type])} {task_type} addresses")
    return ClusterRole(task_type, task_index, sum(len(addresses) for addresses in roles.values()),
                       cluster_has_chief="chief" in roles)


def make_strategy(name: str):
    """The tf.distribute strategy `--strategy name` asks for (imports TensorFlow).

    Create it before any other TensorFlow op: MultiWorkerMirroredStrategy configures the
    runtime's collectives, and logical devices cannot be changed once the runtime is up.
    """
    import tensorflow as tf

    if name == "multiworker":  # first: listing logical devices would start the runtime
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[device.name for device in devices])
    raise ValueError(f"unknown strategy {name!r}")


def describe_strategy(strategy) -> dict:
    """What config.json records of the strategy: its class and how many replicas and workers."""
    resolver = getattr(strategy, "cluster_resolver", None)
    workers = 1
    if resolver is not None and hasattr(resolver, "cluster_spec"):
        spec = resolver.cluster_spec().as_dict()
        workers = max(1, len(spec.get("chief", [])) + len(spec.get("worker", [])))
    return {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync),
            "workers": workers}
