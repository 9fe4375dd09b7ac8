"""The configuration of a moetron GPT exported to Hugging Face (the model is in modeling_moetron.py).

Shipped inside an exported folder and loaded with `trust_remote_code=True`; it imports only transformers. The
fields are the moetron config keys that change the forward pass (model.*, and moe.* for the MoE blocks).
"""
from transformers import PretrainedConfig


class MoetronConfig(PretrainedConfig):
    model_type = "moetron"

    def __init__(self, vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_hidden_size=128,
                 position="learned", activation="gelu", norm_eps=1e-5, rope_base=10000.0,
                 max_position_embeddings=1024, num_experts=0, num_experts_per_tok=1, moe_layers=(),
                 moe_ffn_hidden_size=0, router_type="softmax", renormalize=False, expert_bias_rate=0.0, jitter_eps=0.0,
                 tie_word_embeddings=True, use_cache=True, **kwargs):
        """position: learned | rope (pairs (2i, 2i+1) rotated); activation: gelu (tanh approximation) | swiglu;
        moe_layers: indices of the blocks whose MLP is a mixture of `num_experts` experts, `num_experts_per_tok`
        per token;
        router_type softmax (top-k of the softmax, rescaled to sum to 1 when `renormalize`, chosen with the
        aux-loss-free bias added when `expert_bias_rate` > 0) or sparsemixer (its evaluation rule, mask width
        `jitter_eps`)."""
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.num_heads = num_heads
        self.ffn_hidden_size, self.position, self.activation = ffn_hidden_size, position, activation
        self.norm_eps, self.rope_base, self.max_position_embeddings = norm_eps, rope_base, max_position_embeddings
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_layers = list(moe_layers)
        self.moe_ffn_hidden_size = moe_ffn_hidden_size or ffn_hidden_size
        self.router_type, self.renormalize, self.jitter_eps = router_type, renormalize, jitter_eps
        self.expert_bias_rate = expert_bias_rate  # the rate matters only to training; > 0 turns the bias on
        # the names generation and the auto classes look for
        self.num_hidden_layers, self.num_attention_heads, self.use_cache = num_layers, num_heads, use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
