"""The `moe:` section of the config, nested by concern: the router, the capacity step (with Rectify-Router)
and the kernels. Each part of the MoE layer receives only its own section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from errors import ConfigError

# the expert backends (moe/experts/__init__.py maps each to its module; named here so the config can check a
# name without importing the backends and their Triton kernels)
BACKENDS = ("reference", "padded", "grouped", "scatter", "blocksparse")


@dataclass
class RouterConfig:
    type: str = "softmax"  # softmax | sparsemixer
    renormalize: bool = False  # rescale the top-k weights to sum to 1
    straight_through: bool = False  # with renormalize: its values, the plain probabilities' gradient (top-1: 1)
    jitter_eps: float = 0.0  # multiplicative input jitter U[1-eps, 1+eps] in training (SparseMixer: mask width)
    aux_loss_weight: float = 0.01  # Switch load-balance loss
    aux_loss_scope: str = "micro_batch"  # micro_batch | global
    z_loss_weight: float = 0.0
    expert_bias_rate: float = 0.0  # >0: aux-loss-free balancing bias (DeepSeek-V3), updated after each step
    sinkhorn_iters: int = 0  # >0: training picks the top-k on the Sinkhorn-balanced assignment (S-BASE); 0: off
    sinkhorn_sharpness: float = 12.0  # the logits' spread over tokens that Sinkhorn balances at (moe/router.py)

    def validate(self, top_k: int) -> None:
        choices = {"type": ("softmax", "sparsemixer"), "aux_loss_scope": ("micro_batch", "global")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"moe.router.{key}", f"is {getattr(self, key)!r}; use one of {list(allowed)}")
        for key in ("jitter_eps", "aux_loss_weight", "z_loss_weight", "expert_bias_rate", "sinkhorn_iters"):
            if getattr(self, key) < 0:
                raise ConfigError(f"moe.router.{key}", f"is {getattr(self, key)}; it must be >= 0")
        if self.sinkhorn_sharpness <= 0:
            raise ConfigError("moe.router.sinkhorn_sharpness", f"is {self.sinkhorn_sharpness}; it must be > 0 "
                              "(12 balances the argmax: moe/router.py)")
        if self.straight_through and not self.renormalize:
            raise ConfigError("moe.router.straight_through", "takes the values of the renormalised weights; set "
                              "moe.router.renormalize=true with it")
        if self.sinkhorn_iters and self.expert_bias_rate:
            raise ConfigError("moe.router.sinkhorn_iters", "and moe.router.expert_bias_rate both pick the experts; "
                              "use one of them (set the other to 0)")
        if self.type == "sparsemixer":
            if top_k > 2:
                raise ConfigError("moe.top_k", f"is {top_k} but SparseMixer supports top_k 1 (v1) or 2 (v2)")
            if self.jitter_eps <= 0:
                raise ConfigError("moe.router.jitter_eps", "must be > 0 with router.type=sparsemixer (it is the "
                                  "mask width; 0 keeps only the top expert and the router learns nothing): use 0.1")
            for key in ("renormalize", "straight_through", "expert_bias_rate", "sinkhorn_iters"):
                if getattr(self, key):
                    raise ConfigError(f"moe.router.{key}", "is not supported with moe.router.type=sparsemixer (its "
                                      "multipliers come from the estimator); turn it off or use router.type=softmax")


@dataclass
class CapacityConfig:
    """The capacity step of the padded backend (Tutel/GShard): which assignments each expert keeps."""
    factor: float = 1.0  # capacity = ceil(factor * k * T / E); 0: dynamic, the largest expert load (dropless)
    min: int = 4  # the capacity is at least this
    drop_policy: str = "position"  # position | bpr | probability (moe/capacity.py)
    scope: str = "global"  # global: T is the expert-parallel group's batch | source: each rank's own (GShard)
    rectify_intra: bool = False  # Rectify-Router IR: dropped assignments go to the best expert on their own GPU
    rectify_intra_capped: bool = False  # IR only into slots the top-k left free (one round), not the paper's
    rectify_fill: bool = False  # Rectify-Router FR: empty slots take the best unassigned tokens

    POLICIES: ClassVar[tuple[str, ...]] = ("position", "bpr", "probability")

    @property
    def rectify(self) -> bool:
        return self.rectify_intra or self.rectify_fill

    def validate(self) -> None:
        if self.factor < 0:
            raise ConfigError("moe.capacity.factor", f"is {self.factor}; use 0 (dynamic) or > 0")
        if self.min < 1:
            raise ConfigError("moe.capacity.min", f"is {self.min}; use 1 or more")
        if self.drop_policy not in self.POLICIES:
            raise ConfigError("moe.capacity.drop_policy", f"is {self.drop_policy!r}; use one of "
                              f"{list(self.POLICIES)}")
        if self.scope not in ("global", "source"):
            raise ConfigError("moe.capacity.scope", f"is {self.scope!r}; use global or source")
        if self.rectify_intra_capped and not self.rectify_intra:
            raise ConfigError("moe.capacity.rectify_intra_capped", "needs moe.capacity.rectify_intra=true (it "
                              "chooses how IR uses capacity)")


@dataclass
class KernelConfig:
    """Options of the Triton backends."""
    block_size: int = 128  # blocksparse: rows and columns of a block

    def validate(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError("moe.kernels.block_size", f"is {self.block_size}; use a power of two of at least 16 "
                              "(the GPU's tl.dot needs 16), such as 128")


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0: dense model, no MoE layers
    top_k: int = 1
    backend: str = "reference"  # one of BACKENDS
    ffn_hidden_size: int = 0  # expert width; 0: model.ffn_hidden_size
    layers: str = "all"  # which blocks get an MoE layer: all | even | odd | comma-separated indices
    router: RouterConfig = field(default_factory=RouterConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)  # moe.backend=padded only
    kernels: KernelConfig = field(default_factory=KernelConfig)

    # the flat keys of earlier versions, refused by the loader with their new spelling
    RENAMED: ClassVar[dict[str, str]] = {
        "router_type": "router.type", "renormalize": "router.renormalize", "jitter_eps": "router.jitter_eps",
        "aux_loss_weight": "router.aux_loss_weight", "aux_loss_scope": "router.aux_loss_scope",
        "z_loss_weight": "router.z_loss_weight", "expert_bias_rate": "router.expert_bias_rate",
        "capacity_factor": "capacity.factor", "min_capacity": "capacity.min",
        "drop_policy": "capacity.drop_policy", "rectify_intra": "capacity.rectify_intra",
        "rectify_fill": "capacity.rectify_fill", "block_size": "kernels.block_size"}

    def validate(self) -> None:
        if self.num_experts < 0:
            raise ConfigError("moe.num_experts", f"is {self.num_experts}; use 0 (dense) or a positive count")
        if self.num_experts == 0:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError("moe.top_k", f"is {self.top_k} but must be between 1 and moe.num_experts="
                              f"{self.num_experts}; lower moe.top_k or raise moe.num_experts")
        if self.backend not in BACKENDS:
            raise ConfigError("moe.backend", f"is {self.backend!r}; use one of {sorted(BACKENDS)}")
        if self.ffn_hidden_size < 0:
            raise ConfigError("moe.ffn_hidden_size", f"is {self.ffn_hidden_size}; use 0 (model.ffn_hidden_size) or "
                              "a positive width")
        self.router.validate(self.top_k)
        self.capacity.validate()
        self.kernels.validate()
        if self.capacity.rectify and self.backend != "padded":
            raise ConfigError("moe.capacity.rectify_intra", "Rectify-Router needs moe.backend=padded (it acts on "
                              "dropped assignments and empty capacity slots)")
        if self.capacity.rectify and self.router.type == "sparsemixer":
            raise ConfigError("moe.capacity.rectify_intra", "is not supported with moe.router.type=sparsemixer "
                              "(its multipliers come from the estimator); turn Rectify-Router off")
        if str(self.layers).strip() not in ("all", "even", "odd"):
            self._listed_layers()  # the syntax here; the range against model.num_layers in moe_layer_indices

    @property
    def sizes_reach_host(self) -> bool:
        """Whether the MoE layers read their expert sizes to the host every step (the reference backend's loop,
        the padded backend's dynamic capacity), which a CUDA graph cannot replay."""
        return self.num_experts > 0 and (self.backend == "reference" or (
            self.backend == "padded" and self.capacity.factor == 0))

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        """Block indices that hold an MoE layer."""
        if self.num_experts == 0:
            return []
        spec = str(self.layers).strip()
        if spec == "all":
            return list(range(num_layers))
        if spec in ("even", "odd"):
            return list(range(0 if spec == "even" else 1, num_layers, 2))
        idx = self._listed_layers()
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad:
            raise ConfigError("moe.layers", f"names blocks {bad} but the model has {num_layers} "
                              f"(indices 0..{num_layers - 1}); set moe.layers within them or raise model.num_layers")
        return idx

    def _listed_layers(self) -> list[int]:
        spec = str(self.layers).strip()
        try:
            idx = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise ConfigError("moe.layers", f"is {spec!r}; use all, even, odd or comma-separated block "
                              "indices such as 1,3,5") from None
        if not idx:
            raise ConfigError("moe.layers", "lists no block; use all, even, odd or indices such as 1,3,5")
        return idx
