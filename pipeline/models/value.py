"""A value model: V(s_t) for each response token, from a causal LM's transformer and a linear head.

The state s_t is the prompt and the response tokens before t, so V(s_t) is read where the LM would predict
token t: at position prompt_width - 1 + t of the [left-padded prompt | right-padded response] layout
(pipeline.models.hf.build_sequences), the same position whose logits give log pi(y_t | s_t).
"""

from __future__ import annotations

import torch


def transformer_of(lm: torch.nn.Module) -> torch.nn.Module:
    """The LM's transformer without its LM head (`base_model`: GPT2's `transformer`, Llama's `model`), with any
    LoRA layers that peft put inside it."""
    model = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return model.base_model


class ValueModel(torch.nn.Module):
    """`lm`'s transformer and a linear head on its last (final-normed) hidden state: V = w . h + b, in fp32.
    The head starts at 0 (V = 0: the first advantages are the plain returns), so early critic steps do not
    push noise into the transformer."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.head = torch.nn.Linear(lm.config.hidden_size, 1, dtype=torch.float32, device=lm.device)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, sequences: dict[str, torch.Tensor]) -> torch.Tensor:
        """V(s_t) of each response token of `sequences` (build_sequences' layout): (B, R) fp32."""
        ids, width = sequences["input_ids"], sequences["prompt_width"]
        inputs = {k: sequences[k] for k in ("input_ids", "attention_mask", "position_ids")}
        hidden = transformer_of(self.lm)(**inputs).last_hidden_state
        states = hidden[:, width - 1 : ids.shape[1] - 1]  # position width - 1 + t has seen s_t = prompt + y_<t
        return self.head(states.float()).squeeze(-1)
