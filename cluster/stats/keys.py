"""The store's layout in Redis: key names under one model/run prefix, the header, and their limits.

Keys, all under the prefix `expertmesh:{<model>:<run>}` (the braces are a Redis Cluster hash tag: one slot, so
every multi-key script is atomic on a single server and on a cluster alike):

    :meta        hash    schema, layers, experts, top_k, keep (N windows), decay, head (newest id), created
    :w:<id>      hash    the window's listing: one field per writer delta ("d:<writer>:<seq>") or merged sum
                         ("m:<token>"), value its size in bytes. The window is the sum of its fields' blobs.
    :b:<id>:<field> string  the encoded window (`codec`) of that field. Listing and blobs expire after ttl,
                         the listing first.
    :s:<writer>:<seq> string  a delta staged by its writer for the flush script (short TTL)
    :windows     zset    window ids present (score = id)
    :writers     hash    writer -> floor: its oldest unsettled seq (every lower seq was applied or given up)
    :applied:<writer> zset  seqs >= floor that were applied: with the floor, a retried flush counts once
    :agg         hash    blob (float window), ref (window id its weights refer to), ver, folded
    :sources     hash    source id -> JSON: what `stats push` wrote of one routing file (`push`)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .connect import StatsSchemaError, check_name

__all__ = [
    "SCHEMA",
    "DEFAULT_KEEP",
    "DEFAULT_DECAY",
    "DEFAULT_TTL_S",
    "StatsKeys",
    "StoreHeader",
    "make_header",
    "check_window_id",
]

SCHEMA = "expertmesh.routing-stats/1"
DEFAULT_KEEP = 64
DEFAULT_DECAY = 0.9
DEFAULT_TTL_S = 7 * 24 * 3600
STAGE_TTL_S = 600  # a staged delta whose flush script never ran (writer killed in between) goes away
MAX_WINDOW_ID = 2**53 - 1  # Lua numbers are doubles: ids stay exact up to here


@dataclass(frozen=True)
class StatsKeys:
    model: str
    run: str = "default"

    def __post_init__(self) -> None:
        check_name("model", self.model)
        check_name("run", self.run)

    @property
    def prefix(self) -> str:
        return f"expertmesh:{{{self.model}:{self.run}}}"

    @property
    def meta(self) -> str:
        return self.prefix + ":meta"

    @property
    def writers(self) -> str:
        return self.prefix + ":writers"

    @property
    def index(self) -> str:
        return self.prefix + ":windows"

    @property
    def agg(self) -> str:
        return self.prefix + ":agg"

    @property
    def sources(self) -> str:
        return self.prefix + ":sources"

    @property
    def window_prefix(self) -> str:
        return self.prefix + ":w:"

    def window(self, window_id: int) -> str:
        return f"{self.window_prefix}{int(window_id)}"

    @property
    def blob_prefix(self) -> str:
        return self.prefix + ":b:"

    def blob(self, window_id: int, field: str) -> str:
        return f"{self.blob_prefix}{int(window_id)}:{field}"

    @property
    def stage_prefix(self) -> str:
        return self.prefix + ":s:"

    def stage(self, name: str) -> str:
        return self.stage_prefix + name

    @property
    def applied_prefix(self) -> str:
        return self.prefix + ":applied:"

    def applied(self, writer: str) -> str:
        return self.applied_prefix + writer


@dataclass(frozen=True)
class StoreHeader:
    layers: int
    experts: int
    top_k: int
    keep: int
    decay: float
    head: int  # newest window id, -1 before the first
    created: float

    @classmethod
    def parse(cls, fields: dict, where: str) -> StoreHeader:
        def get(name: str, kind):
            raw = fields.get(name)
            if raw is None:
                raise StatsSchemaError(f"{where}: header field {name!r} missing")
            try:
                return kind(raw)
            except ValueError:
                raise StatsSchemaError(f"{where}: header field {name!r}: expected a number, got {raw!r}") from None

        schema = fields.get("schema")
        if schema != SCHEMA:
            raise StatsSchemaError(f"{where}: not expertmesh statistics (schema {schema!r}, expected {SCHEMA!r})")
        return cls(
            get("layers", int),
            get("experts", int),
            get("top_k", int),
            get("keep", int),
            get("decay", float),
            get("head", int),
            get("created", float),
        )

    def args(self) -> list:
        """ARGV[1..7] of the scripts that create or check a header."""
        return [
            SCHEMA,
            self.layers,
            self.experts,
            self.top_k,
            self.keep,
            repr(self.decay),
            repr(self.created),
        ]


def text(value) -> str:
    """A Redis reply (bytes, or str from a decoding client) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def make_header(
    layers: int, experts: int, top_k: int, keep: int = DEFAULT_KEEP, decay: float = DEFAULT_DECAY
) -> StoreHeader:
    """A header for a new store, validated field by field."""
    for name, value in (("layers", layers), ("experts", experts), ("top_k", top_k), ("keep", keep)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if top_k > experts:
        raise ValueError(f"top_k: expected at most experts={experts}, got {top_k}")
    if not (0.0 < float(decay) <= 1.0) or math.isnan(decay):
        raise ValueError(f"decay: expected a factor in (0, 1], got {decay!r}")
    return StoreHeader(int(layers), int(experts), int(top_k), int(keep), float(decay), -1, time.time())


def check_window_id(window_id: int) -> int:
    if isinstance(window_id, bool) or int(window_id) != window_id or not 0 <= window_id <= MAX_WINDOW_ID:
        raise ValueError(f"window: expected an integer id in [0, 2**53), got {window_id!r}")
    return int(window_id)

