"""The Llama 3 405B batch-size ramp (sec. 3.4.1): batch stages by tokens seen.

Pure Python (no jax), so config files can compute step budgets from it without starting
a backend.

    batch_stages('252e6:1024x8192,2.87e12:2048x8192', 1024, 4096)
    -> [BatchStage(0, 1024, 4096), BatchStage(61, 1024, 8192), BatchStage(342_162, 2048, 8192)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["BatchStage", "batch_stages", "steps_for_tokens"]


@dataclasses.dataclass(frozen=True)
class BatchStage:
    """From step ``start_step`` on, global batches of ``global_batch`` x ``seq_len`` tokens."""

    start_step: int
    global_batch: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def __str__(self) -> str:  # herd.core.data.StagedIterator logs the stage it switches to
        return f"batches of {self.global_batch} x {self.seq_len} tokens"


def batch_stages(ramp: str, global_batch: int, seq_len: int) -> list[BatchStage]:
    """The stages of a batch-size ramp, each with the step it starts at.

    The first stage is ``global_batch`` x ``seq_len`` from step 0. ``ramp`` lists the later
    ones as 'TOKENS:BATCHxSEQ,...': once TOKENS training tokens have been seen (batch x
    seq_len token slots per step, the paper's unit), batches become BATCH sequences of SEQ
    tokens, from the first step boundary at or past TOKENS. '' means no ramp.

    Llama 3 405B (sec. 3.4.1): 4M-token batches of 4,096-token sequences for the first
    252M tokens, then 8M of 8,192, then 16M after 2.87T tokens:
    ``batch_stages('252e6:1024x8192,2.87e12:2048x8192', 1024, 4096)``.
    """
    stages = [BatchStage(0, int(global_batch), int(seq_len))]
    if not ramp or not ramp.strip():
        return stages
    seen = 0  # tokens seen when the last stage starts
    for part in ramp.split(","):
        try:
            tokens_text, shape = part.strip().split(":")
            batch_text, seq_text = shape.lower().split("x")
            tokens, batch, seq = float(tokens_text), int(batch_text), int(seq_text)
        except ValueError:
            raise ValueError(
                f"batch ramp stage {part.strip()!r} is not TOKENS:BATCHxSEQ "
                "(e.g. '252e6:1024x8192')"
            ) from None
        if batch < 1 or seq < 1:
            raise ValueError(f"batch ramp stage {part.strip()!r}: batch and seq must be >= 1")
        prev = stages[-1]
        if not tokens > seen:
            raise ValueError(
                f"batch ramp stage {part.strip()!r} starts at {tokens:.4g} tokens, but "
                f"{seen} tokens are already seen when the stage before it starts (step "
                f"{prev.start_step}): stages must start at increasing token counts"
            )
        steps = -(-(int(tokens) - seen) // prev.tokens_per_step)  # ceil
        stages.append(BatchStage(prev.start_step + steps, batch, seq))
        seen += steps * prev.tokens_per_step
    return stages


def steps_for_tokens(stages: Sequence[BatchStage], tokens: float) -> int:
    """Steps until ``tokens`` training tokens are seen (the last one may overshoot)."""
    seen = 0  # tokens seen when `stage` starts
    for stage, following in zip(stages, [*stages[1:], None], strict=True):
        if following is not None:
            in_stage = (following.start_step - stage.start_step) * stage.tokens_per_step
            if seen + in_stage < tokens:
                seen += in_stage
                continue
        return stage.start_step + max(0, -(-(int(tokens) - seen) // stage.tokens_per_step))
    raise ValueError("no batch stages")
