"""transformers integration: ``AutoModelForCausalLM.from_pretrained(<sqllm folder>)``.

transformers picks a quantizer by ``quantization_config["quant_method"]``
(``transformers.quantizers.auto``).  For ``"sqllm"`` this module registers:

* :class:`SqllmHfConfig`, a ``QuantizationConfigMixin`` that wraps a
  :class:`sqllm.QuantizationConfig` (so reading it validates it, and
  ``save_pretrained`` writes it back unchanged);
* :class:`SqllmHfQuantizer`, an ``HfQuantizer`` that swaps the Linears named in
  the config for empty sqllm layers of the recorded formats before transformers
  reads the weights (their buffers then load like any tensor), and validates
  every layer afterwards.

Loading only: quantizing on load (a full-precision model with
``quantization_config=SqllmHfConfig(...)``) is refused with a pointer to
``sqllm.quantize``, which needs calibration data.

``import sqllm`` does not import this module (transformers' quantizer registry
costs seconds to import); ``sqllm._hf_hook`` imports it the moment transformers
loads ``transformers.quantizers.auto``, or at once if it already has.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from transformers.quantizers import auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .config import QuantizationConfig

__all__ = ["SqllmHfConfig", "SqllmHfQuantizer", "register", "QUANT_METHOD"]

log = logging.getLogger(__name__)

QUANT_METHOD = "sqllm"



class SqllmHfConfig(QuantizationConfigMixin):
    """transformers' view of a :class:`sqllm.QuantizationConfig` (``quant_method: "sqllm"``).

    ``sqllm_config`` is the validated sqllm object; ``to_dict()`` is its
    JSON form, which ``save_pretrained`` writes to ``config.json``.
    """

    def __init__(self, sqllm_config: Optional[QuantizationConfig] = None,
                 **config_dict: Any) -> None:
        if sqllm_config is None:
            sqllm_config = QuantizationConfig.from_dict(
                {"quant_method": QUANT_METHOD, **config_dict})
        elif config_dict:
            raise TypeError("pass either a QuantizationConfig or its dict, not both")
        self.sqllm_config = sqllm_config
        self.quant_method = QUANT_METHOD

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], return_unused_kwargs: bool = False,
                  **kwargs: Any) -> Any:
        cfg = cls(QuantizationConfig.from_dict(config_dict))
        if return_unused_kwargs:
            return cfg, kwargs
        return cfg

    @property
    def modules_to_not_convert(self) -> list:
        return list(self.sqllm_config.modules_to_not_convert)

    def to_dict(self) -> Dict[str, Any]:
        return self.sqllm_config.to_dict()

    def __iter__(self) -> Any:
        yield from self.to_dict().items()


class SqllmHfQuantizer(HfQuantizer):
    """Loads folders written by :func:`sqllm.save_quantized` (pre-quantized only)."""

    requires_calibration = True
    quantization_config: SqllmHfConfig

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ValueError("sqllm quantizes with sqllm.quantize(model, ...) (it needs "
                             "calibration data); from_pretrained only loads sqllm folders")
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
            raise ValueError("sqllm models load on one device; pass device_map=None, 'cpu' "
                             "or a single device and move the model with .to()")

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from torch import nn

        from .api import set_module

        qc = self.quantization_config.sqllm_config
        for name, entry in qc.layers.items():
            try:
                target = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"quantization_config names layer {name!r}, which the "
                                 "model does not have") from None
            if not isinstance(target, nn.Linear):
                raise ValueError(f"quantization_config names layer {name!r}, a "
                                 f"{type(target).__name__}, not a Linear")
            set_module(model, name, entry.build())
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from .nn import QuantLinearBase

        for name, m in model.named_modules():
            if not isinstance(m, QuantLinearBase):
                continue
            meta = [n for n, b in m.named_buffers() if b.is_meta]
            if meta:
                raise ValueError(f"layer {name}: the checkpoint lacks {meta}")
            try:
                m.validate()
            except ValueError as e:
                raise ValueError(f"layer {name}: {e}") from None
        return model

    def _dequantize(self, model: Any, dtype: Any = None) -> Any:
        """``model.dequantize()``: every sqllm layer back to an ``nn.Linear`` holding
        its dequantized weight (dense + sparse part)."""
        import torch
        from torch import nn

        from .api import set_module
        from .nn import QuantLinearBase

        for name, m in list(model.named_modules()):
            if not isinstance(m, QuantLinearBase):
                continue
            device = next(iter(m.buffers())).device
            dt = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                            device=device, dtype=dt)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            set_module(model, name, lin)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register :class:`SqllmHfConfig` and :class:`SqllmHfQuantizer` for
    ``quant_method: "sqllm"`` with transformers' own decorators (idempotent)."""
    for mapping, kind, cls, decorator in (
            (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "config", SqllmHfConfig,
             auto.register_quantization_config),
            (auto.AUTO_QUANTIZER_MAPPING, "quantizer", SqllmHfQuantizer, auto.register_quantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is cls:
            continue
        if current is not None:
            if getattr(current, "__module__", "") != __name__:
                log.warning("transformers already has a %r %s (%s); leaving it in place",
                            QUANT_METHOD, kind, current)
                continue
            del mapping[QUANT_METHOD]  # an earlier copy of this module (a reload)
        decorator(QUANT_METHOD)(cls)


register()
