"""vLLM's CPU LoRA wrapper, without its cost on steps that serve no adapter.

With LoRA enabled, every linear layer of every step goes through the punica
wrapper. On CPU vLLM always takes the "prefill" (SGMV) path, whose kernels
already return at once when no token of the step has an adapter
(``no_lora``), but ``add_lora_linear`` still allocates its float32 buffers
and walks the slices first, for every layer: measured through the daemon at
8 streams without adapters, ~14% of the engine thread's time went there.
This wrapper returns before any of it when the step has no adapter, so a
daemon that can serve adapters costs nothing more on the steps that do not.
Steps that mix adapters and the base model are vLLM's own path, unchanged.

The logits hook is skipped on the same condition: vLLM's CPU ``bgmv`` gathers
a slot by index, and a base-model row's index is -1 (the last slot, whose
lm_head weights are zero unless an adapter trains lm_head), so skipping it
gives the base model's logits exactly.

Only ``vllm_engine`` names this class (through ``CpuPlatform.get_punica_wrapper``),
before the engine is built; CUDA's wrapper already skips inside its kernels.
"""

from __future__ import annotations

from typing import Any

from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

WRAPPER_PATH = f"{__name__}.PunicaWrapperSkipBase"


class PunicaWrapperSkipBase(PunicaWrapperCPU):
    def _no_adapter(self) -> bool:
        return bool(self.is_prefill and self.no_lora)

    def add_lora_linear(self, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: float,
                        output_slices: Any, *, buffer: Any = None, **kwargs: Any) -> None:
        if self._no_adapter():
            return None
        return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                       buffer=buffer, **kwargs)

    def add_lora_logits(self, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: Any, *,
                        buffer: Any = None, **kwargs: Any) -> None:
        if self._no_adapter():
            return None
        return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale,
                                       buffer=buffer, **kwargs)


def install() -> None:
    """Make vLLM's CPU platform build this wrapper (in process: the engine core runs in this one)."""
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: WRAPPER_PATH)  # type: ignore[method-assign,assignment]
