"""expertmesh.workers: the data plane. Expert-parallel groups of Ray actors serving MoE checkpoints.

    from expertmesh.workers import EPGroup, GroupConfig, SamplingParams
    group = EPGroup.create(GroupConfig(model="path/to/Mixtral-8x7B", plan="plan.json", workers=2, device="cuda"))
    tokens = group.generate([[1, 2, 3]], max_new_tokens=32)

Model families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE (Hugging Face format, safetensors). See `group`
for the step API, `worker` for one member, `model` for the layer stack, `moe` for the expert pipeline.
"""

from .config import FAMILIES, ModelConfig, ModelConfigError, read_model_config
from .group import EPGroup, GroupError, StepTimeout, WorkerFailure
from .group_config import GroupConfig, StatsSettings, Timeouts
from .local import load_local_model, run_step
from .moe import LayerMeasure, StepContext
from .plans import PlanMismatchError, check_plan, contiguous_plan
from .recording import StatsRecorder, StatsSink
from .sampling import GREEDY, SamplingParams
from .worker import ExpertWorker, StepOutput

__all__ = [
    "EPGroup", "GroupConfig", "Timeouts", "StatsSettings", "StepContext",
    "ExpertWorker", "StepOutput", "LayerMeasure", "GroupError", "WorkerFailure", "StepTimeout",
    "PlanMismatchError", "ModelConfig", "ModelConfigError", "FAMILIES", "read_model_config",
    "contiguous_plan", "check_plan", "SamplingParams", "GREEDY", "StatsSink", "StatsRecorder",
    "load_local_model", "run_step",
]
