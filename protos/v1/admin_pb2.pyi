from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("ready", "draining", "replicas", "workers_per_replica", "waiting", "running", "kv_blocks_used", "kv_blocks_total", "preemptions", "plan_version")
    READY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_PER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    draining: bool
    replicas: int
    workers_per_replica: int
    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    preemptions: int
    plan_version: str
    def __init__(self, ready: _Optional[bool] = ..., draining: _Optional[bool] = ..., replicas: _Optional[int] = ..., workers_per_replica: _Optional[int] = ..., waiting: _Optional[int] = ..., running: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., preemptions: _Optional[int] = ..., plan_version: _Optional[str] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPlanResponse(_message.Message):
    __slots__ = ("version", "strategy", "num_layers", "num_experts", "num_gpus", "num_nodes", "plan_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    strategy: str
    num_layers: int
    num_experts: int
    num_gpus: int
    num_nodes: int
    plan_json: str
    def __init__(self, version: _Optional[str] = ..., strategy: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., num_gpus: _Optional[int] = ..., num_nodes: _Optional[int] = ..., plan_json: _Optional[str] = ...) -> None: ...

class GetRoutingSummaryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerRouting(_message.Message):
    __slots__ = ("layer", "balancedness", "copies_per_token")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    COPIES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    layer: int
    balancedness: float
    copies_per_token: float
    def __init__(self, layer: _Optional[int] = ..., balancedness: _Optional[float] = ..., copies_per_token: _Optional[float] = ...) -> None: ...

class GetRoutingSummaryResponse(_message.Message):
    __slots__ = ("plan_version", "balancedness", "balancedness_worst", "copies_per_token", "layers")
    PLAN_VERSION_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_WORST_FIELD_NUMBER: _ClassVar[int]
    COPIES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    plan_version: str
    balancedness: float
    balancedness_worst: float
    copies_per_token: float
    layers: _containers.RepeatedCompositeFieldContainer[LayerRouting]
    def __init__(self, plan_version: _Optional[str] = ..., balancedness: _Optional[float] = ..., balancedness_worst: _Optional[float] = ..., copies_per_token: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[LayerRouting, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("grace_seconds",)
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    grace_seconds: float
    def __init__(self, grace_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("running",)
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    running: int
    def __init__(self, running: _Optional[int] = ...) -> None: ...
