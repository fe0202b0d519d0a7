"""Hugging Face interop: import and export DeepSeek-V3, Mixtral and Qwen3-MoE checkpoints (config.json + safetensors).

    cfg, state_dict = load_hf_checkpoint("hf_folder")         # ModelConfig + our state dict
    model = from_hf("hf_folder", max_seq_len=4096)            # MoETransformer with the weights loaded
    export_hf(model, "out_folder", arch="deepseek_v3")        # loads back in transformers' AutoModelForCausalLM

Folders hold what ``save_pretrained`` writes: ``config.json`` and ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. ``transformers`` is not needed (it is a test dependency); ``safetensors`` is.

Layout decisions (import; export is the exact inverse, so import(export(m)) gives m's state dict bit for bit):

* Linear weights are ``[out, in]`` on both sides and copied as they are. Routed experts are stacked here,
  ``w13 [E, D, 2H]`` (gate | up) and ``w2 [E, H, D]``, and per expert there (``experts.{e}.gate_proj [H, D]``,
  ``up_proj [H, D]``, ``down_proj [D, H]``; Mixtral: ``w1``, ``w3``, ``w2``): transposed and stacked. The fused
  in-memory layout of transformers 5 (``experts.gate_up_proj [E, 2H, D]``, ``experts.down_proj [E, D, H]``) is
  accepted on import too; export writes the per-expert layout that released checkpoints use.
* RoPE: Mixtral and Qwen3 checkpoints use rotate-half within each head, as we do. DeepSeek checkpoints store the
  rotary rows of ``q_b_proj`` / ``q_proj`` and ``kv_a_proj_with_mqa`` interleaved (pairs ``(x0, x1), (x2, x3)``
  rotated together; transformers' ``rope_interleave=True``). We permute those rows to ``[x0, x2, ..., x1, x3, ...]``
  on import, after which rotate-half gives the same rotated vectors in the same order, so no attention flag is
  needed; with ``rope_interleave=false`` the rows are copied unchanged. Export writes interleaved rows.
* Router: ``gate.weight`` is our ``router.gate.weight``; DeepSeek's ``e_score_correction_bias`` is our
  ``router.expert_bias``. Our router adds the bias for selection only while ``bias_update_speed > 0``, so DeepSeek
  imports set ``bias_update_speed=1e-3`` (DeepSeek-V3's gamma); pass ``bias_update_speed=...`` to change it.
* MTP (DeepSeek-V3): depth k is checkpoint layer ``num_hidden_layers + k - 1`` (``enorm``, ``hnorm``, ``eh_proj``,
  ``shared_head.norm`` and a full decoder layer; its copies ``embed_tokens`` / ``shared_head.head`` of the main
  embedding and head are written on export and not read on import, as our MTP shares them). Import sets
  ``mtp_depth`` to the MTP layers present; transformers itself skips them. Other architectures have no MTP layers:
  export drops ``mtp.*`` with a warning.

Refused with a ``ValueError`` naming the setting: RoPE scaling (YaRN, linear, dynamic, ...), sliding-window
attention shorter than the context, attention or MLP biases, activations other than SiLU, dense/MoE layer patterns
other than "first k dense", top-1 routing with renormalised weights (our router keeps the raw score for k=1),
DeepSeek routing other than sigmoid + ``noaux_tc``, MLA with fewer key/value heads than heads, and DeepSeek's MLA
norms with an epsilon other than 1e-6 (transformers and the reference code hard-code it there). transformers'
training-time knobs (dropout, ``router_jitter_noise``, ``router_aux_loss_coef``) are not read.
"""

from lightning_moe.models.hf.checkpoint import export_hf, from_hf, load_hf_checkpoint
from lightning_moe.models.hf.config import ARCHS, DEEPSEEK_BIAS_UPDATE_SPEED, HF_CLASSES, config_from_hf, config_to_hf
from lightning_moe.models.hf.weights import state_dict_from_hf, state_dict_to_hf

__all__ = ["ARCHS", "DEEPSEEK_BIAS_UPDATE_SPEED", "HF_CLASSES", "config_from_hf", "config_to_hf", "export_hf",
           "from_hf", "load_hf_checkpoint", "state_dict_from_hf", "state_dict_to_hf"]
