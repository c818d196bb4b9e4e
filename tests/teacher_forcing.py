"""Reference distributions for tests: teacher-force a local teacher's model on a given completion."""

from __future__ import annotations

import torch

from bitnet_kde.teachers import TeacherSequence
from bitnet_kde.teachers.local import LocalHFTeacher


@torch.inference_mode()
def forced_topk(teacher: LocalHFTeacher, prompt: str, completion_ids: list[int], k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, k] log-probs, [n, k] ids): the top-K at each completion token, from one unpadded
    forward pass of `teacher.lm` over the chat-formatted prompt followed by the completion."""
    chat = teacher.chat_ids(prompt)
    ids = torch.tensor([chat + list(completion_ids)], device=teacher.lm.device)
    logits = teacher.lm(input_ids=ids).logits[0].float()
    # logits at position p predict token p + 1: completion token j is predicted at len(chat) - 1 + j
    lp = torch.log_softmax(logits[len(chat) - 1:len(chat) - 1 + len(completion_ids)], dim=-1)
    return lp.topk(min(k, lp.shape[-1]), dim=-1)


def score_text(teacher: LocalHFTeacher, prompt: str, text: str, k: int) -> TeacherSequence:
    """The teacher's own tokenization of `text` after `prompt`, with its top-K at every token."""
    tok = teacher.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    top_lp, top_ids = forced_topk(teacher, prompt, ids, k)

    def piece(i: int) -> str:
        return tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return TeacherSequence(prompt=prompt, text=text, tokens=[piece(i) for i in ids],
                           topk_tokens=[[piece(i) for i in row] for row in top_ids.tolist()],
                           topk_logprobs=top_lp.tolist(), token_ids=ids, topk_ids=top_ids.tolist(),
                           finish_reason="scored")
