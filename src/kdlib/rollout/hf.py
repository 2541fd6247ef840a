"""transformers rollout backend: batched ``generate`` with left padding, on CPU or GPU."""

from __future__ import annotations

import torch

from kdlib.config.schema import ModelConfig, RolloutConfig
from kdlib.models.student import build_model
from kdlib.rollout.base import Generation, RolloutBackend


class HFRolloutBackend(RolloutBackend):
    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        super().__init__(model, device)
        self.model = build_model(model, device)
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], cfg: RolloutConfig, *, stop_ids: set[int], pad_id: int, seed: int
    ) -> list[list[Generation]]:
        out: list[list[Generation]] = [[] for _ in prompts]
        repeated = [(i, p) for i, p in enumerate(prompts) for _ in range(cfg.n_samples_per_prompt)]
        torch.manual_seed(seed)
        for start in range(0, len(repeated), cfg.batch_size):
            chunk = repeated[start : start + cfg.batch_size]
            ids, attention = _left_pad([p for _, p in chunk], pad_id)
            sampling = (
                {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
                if cfg.temperature > 0
                else {"do_sample": False}
            )
            sequences = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=sorted(stop_ids),
                pad_token_id=pad_id,
                **sampling,
            )
            new_tokens = sequences[:, ids.shape[1]:].tolist()
            for (prompt_index, _), tokens in zip(chunk, new_tokens):
                out[prompt_index].append(_until_stop(tokens, stop_ids))
        return out


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[row, length - len(prompt):] = 1
    return ids, attention


def _until_stop(tokens: list[int], stop_ids: set[int]) -> Generation:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return Generation(tokens[: i + 1], "stop")
    return Generation(tokens, "length")
