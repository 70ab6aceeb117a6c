"""expertmesh.workers.train: the trainable MoE families, expert-parallel with autograd through the one pipeline.

    from expertmesh.workers.train import TrainableMoE, TrainSettings
    model = TrainableMoE.from_checkpoint(path, plan, rank, world_size, TrainSettings(precision="fp8"))
    out = model(input_ids, labels)       # this rank's share of the batch loss (+ its lm / aux / z parts)
    out.loss.backward()
    model.sum_replica_grads()            # replicated experts: every slot gets the sum over its replicas

See `model` for the loss convention and what a data-parallel engine must still reduce.
"""

from .grads import ReplicaPlan, sum_grads, sum_replica_grads
from .losses import IGNORE_INDEX, LossShares, loss_shares
from .master import MasterWeights
from .model import FP8_RECIPES, PRECISIONS, TrainableMoE, TrainOutput, TrainSettings

__all__ = [
    "TrainableMoE", "TrainSettings", "TrainOutput", "PRECISIONS", "FP8_RECIPES", "IGNORE_INDEX",
    "LossShares", "loss_shares", "MasterWeights", "ReplicaPlan", "sum_replica_grads", "sum_grads",
]
